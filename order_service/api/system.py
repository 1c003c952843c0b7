"""`GET /system`: the subscriber registry against the broker's real topology."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from aio_pika.abc import AbstractConnection
from fastapi import APIRouter, Request

from common.kit.topology import Topology
from common.ops.observe import event_exchanges, read_broker
from common.ops.system_report import Announced, SystemReport, compare
from order_service.api.dependencies import LateAfter, OrderRuntime, Running, Settings
from order_service.settings import OrderSettings
from order_service.store import OrderStore
from order_service.tracker import settle_answered

T = TypeVar("T")

router = APIRouter()


class Recent(Generic[T]):
    """The last answer of an expensive read, reused for `ttl` seconds.

    However many pages poll `GET /system`, the broker and the late orders are read at most
    once per `ttl`; callers arriving meanwhile wait for the read in progress.
    """

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._lock = asyncio.Lock()
        self._value: T | None = None
        self._at = 0.0

    async def get(self, read: Callable[[], Awaitable[T]]) -> T:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at >= self.ttl:
                self._value = await read()
                self._at = time.monotonic()
            return self._value


@router.get("/system", response_model=SystemReport, summary="Expected vs actual")
async def system(request: Request, rt: Running, settings: Settings,
                 late_after: LateAfter) -> SystemReport:
    """The subscriber registry against the broker's real topology.

    Reports an announced subscriber whose queue is missing or has no consumer, a queue
    bound to an event exchange that nobody announced, stale subscribers, dead letters
    waiting and late orders. The broker is read through the management API (through
    AMQP passive declares when it does not answer). The answer is computed at most once
    a second, however many clients ask.
    """
    recent: Recent[SystemReport] = request.app.state.system_report
    return await recent.get(functools.partial(_report, rt, settings, late_after))


async def _report(rt: OrderRuntime, settings: OrderSettings, late_after: timedelta
                  ) -> SystemReport:
    now = datetime.now(UTC)
    await settle_answered(rt.commits, now, now - late_after)
    async with rt.engine.connect() as conn:
        store = OrderStore(conn)
        registry = await store.list_subscribers()
        late = len(await store.late_orders(now, late_after))
    kit = [Topology(settings.name_prefix).audit_queue]
    expected = sorted({q for s in registry for q in s.consumes.values()} | set(kit))
    # The service's own connection serves the AMQP fallback (the protocol does not promise
    # one: the API's tests run without a broker).
    connection = getattr(rt, "connection", None)
    snapshot = await read_broker(
        settings, expected, exchanges=event_exchanges(settings.name_prefix),
        connection=connection if isinstance(connection, AbstractConnection) else None)
    return compare(snapshot, [Announced(s.name, s.consumes, s.last_seen) for s in registry],
                   prefix=settings.name_prefix, now=now,
                   announce_interval=settings.announce_interval, late_orders=late,
                   kit_queues=kit)
