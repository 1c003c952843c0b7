"""Helpers for tests on a real broker: polling with a deadline, settings, clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import uvicorn
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.types import ASGIApp

from common.events import EVENT_TYPES, DeliveryReceipt, Event, receipts_of
from common.kit.runner import Runtime
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops.observe import sweep_prefix
from order_service.api.dependencies import Work

T = TypeVar("T")

StartService = Callable[..., Awaitable[Runtime[Any]]]


def receipts_in(message: aio_pika.abc.AbstractIncomingMessage) -> tuple[DeliveryReceipt, ...]:
    """The receipts an audit message carries: one (DeliveryReceipt), a batch's
    (DeliveryReceipts), or none (an announcement)."""
    cls = EVENT_TYPES.get(message.type or "")
    return receipts_of(cls.model_validate_json(message.body)) if cls is not None else ()


async def wait_for(probe: Callable[[], Awaitable[T | None]], *, timeout: float = 10.0,
                   interval: float = 0.05, what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy, or fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: T | None = None
    while loop.time() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)  # polling interval under a deadline, not a fixed wait
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")


def settings_for(cls: type[ServiceSettings], amqp_url: str, prefix: str, tmp_path: Path,
                 **overrides: Any) -> ServiceSettings:
    """Settings for one in-process service: its own SQLite file, the test's prefix."""
    values: dict[str, Any] = {
        "amqp_url": amqp_url, "name_prefix": prefix, "log_format": "console",
        "database_url": f"sqlite+aiosqlite:///{tmp_path / (cls.service_name + '.db')}",
        "announce_interval": 3600.0,
        # Short delays so retry paths finish in a test's time; they still grow.
        "retry_delays": (0.2, 0.6),
        "consumer_check_interval": 0.5,
    }
    values.update(overrides)
    return cls(**values)



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: pytest keeps Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_app(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` over HTTP on a free local port in this event loop; yields its base URL.

    For commands that talk to the order API as a real client does (`shop doctor`,
    `shop order ...`) while the services run in-process.
    """
    port = free_port()
    server = _QuietServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                         lifespan="off"))
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        if serving.done():
            serving.result()  # raises why it stopped
        return server.started

    try:
        await wait_for(started, what="the HTTP server to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


async def delete_topology(amqp_url: str, topologies: list[Topology], prefix: str,
                          management_url: str | None = None) -> None:
    """Delete every queue and exchange the test declared (all carry the test's prefix)."""
    queues = {q for t in topologies for q in t.declared_queues}
    exchanges = {e for t in topologies for e in t.declared_exchanges}
    assert all(n.startswith(prefix) for n in queues | exchanges), "only delete our own names"
    connection = await aio_pika.connect(amqp_url)
    try:
        for name in sorted(queues):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        for name in sorted(exchanges):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
    finally:
        await connection.close()
    if management_url is not None:
        await asyncio.to_thread(sweep_prefix, management_url, prefix)


class OneByOne:
    """Transactions one at a time, each with its own commit (the runtime groups them)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def run(self, work: Callable[[AsyncConnection], Coroutine[Any, Any, T]]) -> T:
        async with self.engine.begin() as conn:
            return await work(conn)


class FakeRuntime:
    """The runtime the API needs, without a broker: `execute` commits and collects events."""

    def __init__(self, engine: AsyncEngine, settings: ServiceSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.commits = OneByOne(engine)
        self.published: list[Event] = []
        self.broker_up = True
        self.database_up = True

    async def execute(self, work: Work) -> list[Event]:
        async with self.engine.begin() as conn:
            events: Sequence[Event] = await work(conn)
        self.published.extend(events)
        return list(events)

    def broker_ok(self) -> bool:
        return self.broker_up

    async def db_ok(self) -> bool:
        if not self.database_up:
            raise ConnectionError("database gone")
        return True


def order_body(**changes: Any) -> dict[str, Any]:
    """A valid POST /orders body, with `changes` at its top level."""
    body: dict[str, Any] = {
        "customer_id": "cust-1",
        "lines": [{"sku": "SKU-BOOK-1", "quantity": 2, "unit_price": "19.99",
                   "seller_id": "books"}],
        "currency": "EUR",
        "shipping_address": {"name": "Ada", "street": "1 Row", "city": "Berlin",
                             "postal_code": "10115", "country": "DE"},
    }
    body.update(changes)
    return body
