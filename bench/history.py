"""Case 6b: the operator's reads over a long history, on the order service's own store.

`GET /system` (which the live page asks every two seconds) and `GET /orders?late=true` look
for late orders; `GET /orders` lists the latest. This case fills an order database with
`history_orders` orders, every one answered by its three expected subscribers except one in
10,000, straight through SQL (the rows the running system writes, without the hours it
takes to place them), then times what those endpoints run, on SQLite inline as the service
runs it:
- the late scan over the whole history, nothing settled yet: what every look cost before
  answered orders were settled, and what the first look after an upgrade would cost without
  settling in chunks;
- the first look: settling the history chunk by chunk (each chunk a transaction, the longest
  is how long the event loop waits at most), then the scan;
- later looks: settle what is new (nothing, here) and scan, median of several;
- the latest 50 orders with their fan-out (`GET /orders`).
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from common.kit.db import create_tables, make_engine
from common.kit.outbox import kit_metadata
from order_service.store import OrderStore
from order_service.store.tables import deliveries, metadata, order_expectations, orders, subscribers

SUBSCRIBERS = ("inventory", "logistics", "seller")
#: One order in this many (fewer in a small run) is left unanswered by logistics: the late
#: orders to find.
UNANSWERED_EVERY = 10_000
LATE_AFTER = timedelta(minutes=5)
#: Later looks timed, for their median.
LOOKS = 5
_ROWS_PER_INSERT = 10_000


async def history(db_path: str, count: int) -> dict[str, Any]:
    engine = make_engine(f"sqlite+aiosqlite:///{db_path}")
    try:
        started = time.perf_counter()
        unanswered = await _fill(engine, count)
        fill_s = time.perf_counter() - started
        now = datetime.now(UTC)
        unsettled_scan_s, found = await _timed_scan(engine, now)
        first_settle_s, chunks, longest_s = await _settle(engine, now)
        first_scan_s, _ = await _timed_scan(engine, now)
        looks = []
        for _ in range(LOOKS):
            now = datetime.now(UTC)
            settle_s, _, _ = await _settle(engine, now)
            scan_s, late = await _timed_scan(engine, now)
            looks.append(settle_s + scan_s)
            if late != unanswered:
                raise AssertionError(f"found {late} late orders, {unanswered} expected")
        started = time.perf_counter()
        async with engine.connect() as conn:
            await OrderStore(conn).list_orders(50, now=now, late_after=LATE_AFTER)
        list_s = time.perf_counter() - started
    finally:
        await engine.dispose()
    if found != unanswered:
        raise AssertionError(f"found {found} late orders, {unanswered} expected")
    return {
        "look_ms": statistics.median(looks) * 1000,
        "unsettled_scan_ms": unsettled_scan_s * 1000,
        "first_look_ms": (first_settle_s + first_scan_s) * 1000,
        "first_look_transactions": chunks,
        "first_look_longest_transaction_ms": longest_s * 1000,
        "latest_50_ms": list_s * 1000,
        "late_found": found,
        "orders": count,
        "fill_s": fill_s,
    }


async def _fill(engine: AsyncEngine, count: int) -> int:
    """`count` orders over the last two days, a subscriber registry that predates them, each
    order's expectations and handled receipts; returns how many were left unanswered."""
    await create_tables(engine, kit_metadata, metadata)
    now = datetime.now(UTC)
    start = now - timedelta(days=2)
    async with engine.begin() as conn:
        await conn.execute(sa.insert(subscribers), [{
            "name": name, "consumes": json.dumps({"OrderPlaced": f"{name}.order.placed"}),
            "instance": "bench:1", "first_seen": start - timedelta(days=1), "last_seen": now,
        } for name in SUBSCRIBERS])
    step = (now - LATE_AFTER * 2 - start) / max(1, count)
    every = max(2, min(UNANSWERED_EVERY, count // 10))
    unanswered = 0
    for base in range(0, count, _ROWS_PER_INSERT):
        placed, expected, receipts = [], [], []
        for n in range(base, min(count, base + _ROWS_PER_INSERT)):
            order_id, event_id, at = str(uuid.uuid4()), str(uuid.uuid4()), start + step * n
            placed.append({"order_id": order_id, "customer_id": "bench", "currency": "EUR",
                           "total": 1, "placed_at": at, "state": "confirmed", "body": "{}",
                           "event_id": event_id})
            silent = n % every == every - 1
            unanswered += silent
            for name in SUBSCRIBERS:
                expected.append({"order_id": order_id, "subscriber": name})
                if silent and name == "logistics":
                    continue
                receipts.append({
                    "receipt_id": str(uuid.uuid4()), "order_id": order_id,
                    "correlation_id": order_id, "event_id": event_id,
                    "event_type": "OrderPlaced", "subscriber": name,
                    "queue": f"{name}.order.placed", "outcome": "handled", "received_at": at,
                    "duration_ms": 1.0})
        async with engine.begin() as conn:
            await conn.execute(sa.insert(orders), placed)
            await conn.execute(sa.insert(order_expectations), expected)
            await conn.execute(sa.insert(deliveries), receipts)
    return unanswered


async def _timed_scan(engine: AsyncEngine, now: datetime) -> tuple[float, int]:
    started = time.perf_counter()
    async with engine.connect() as conn:
        late = await OrderStore(conn).late_orders(now, LATE_AFTER)
    return time.perf_counter() - started, len(late)


async def _settle(engine: AsyncEngine, now: datetime) -> tuple[float, int, float]:
    """As the API does before a late scan; returns (seconds, transactions, longest one)."""
    started = time.perf_counter()
    after: datetime | None = None
    chunks, longest = 0, 0.0
    while True:
        began = time.perf_counter()
        async with engine.begin() as conn:
            after = await OrderStore(conn).settle_answered(now, now - LATE_AFTER, after=after)
        longest = max(longest, time.perf_counter() - began)
        chunks += 1
        if after is None:
            return time.perf_counter() - started, chunks, longest
