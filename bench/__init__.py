"""The benchmark harness: the system beside raw aio-pika and FastStream (`make bench`)."""
