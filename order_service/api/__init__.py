"""The order service's HTTP API: FastAPI routers over the running service.

- `app.py`: the application assembled (middlewares, error answers, routers) and served.
- `dependencies.py`: what a route is given: the running service, its settings.
- `orders.py`: place an order, read its status and timeline, list orders a page at a time.
- `subscribers.py`: the subscriber registry, and retiring a subscriber.
- `system.py`: the registry against the broker (`GET /system`).
- `health.py`, `page.py`, `asyncapi.py`: the health probe, the live page, the contracts.
- `access.py`, `body_limit.py`: who may call it, and how large a body may be.
- `errors.py`: the answers to a request the API cannot take.
- `server.py`: uvicorn, with the limits its HTTP protocol lacks.
"""
