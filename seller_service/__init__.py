"""The seller service."""
