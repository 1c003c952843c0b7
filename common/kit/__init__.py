"""The delivery kit: how a service is declared, connected, fed, and kept exactly-once."""
