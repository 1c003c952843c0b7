"""Operator tools: the `shop` CLI, the doctor, dead-letter tools, queue views, broker users."""
