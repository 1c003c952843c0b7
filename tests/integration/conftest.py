"""Fixtures for tests on a real broker: services run in-process under a unique name prefix."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import pytest

from common.runner import Runtime, ServiceRunner
from common.service import ServiceSpec
from common.settings import ServiceSettings
from common.topology import Topology

T = TypeVar("T")

StartService = Callable[..., Awaitable[Runtime[Any]]]


async def wait_for(probe: Callable[[], Awaitable[T]], *, timeout: float = 10.0,
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
    }
    values.update(overrides)
    return cls(**values)


@pytest.fixture
async def amqp(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A plain connection for the test itself (publishing raw messages, inspecting queues)."""
    connection = await aio_pika.connect_robust(amqp_url)
    yield connection
    await connection.close()


@pytest.fixture
async def start_service(amqp_url: str, name_prefix: str, tmp_path: Path
                        ) -> AsyncIterator[StartService]:
    """Start services in-process; stop them and delete everything they declared afterwards."""
    runners: list[ServiceRunner[Any]] = []

    async def start(spec: ServiceSpec[Any], settings_cls: type[ServiceSettings] = ServiceSettings,
                    **overrides: Any) -> Runtime[Any]:
        settings = settings_for(settings_cls, amqp_url, name_prefix, tmp_path, **overrides)
        runner = ServiceRunner(spec, settings, broker_wait=10)
        runners.append(runner)
        return await runner.__aenter__()

    yield start
    for runner in reversed(runners):
        await runner.stop()
    await delete_topology(amqp_url, [r.topology for r in runners], name_prefix)


async def delete_topology(amqp_url: str, topologies: list[Topology], prefix: str) -> None:
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
