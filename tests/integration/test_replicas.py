"""Two replicas of a service on one PostgreSQL database and one queue: one effect per event."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import aio_pika
import pytest
import sqlalchemy as sa

from common.events import (
    DeliveryReceipt,
    Event,
    OrderPlaced,
    StockReservationFailed,
    StockReserved,
)
from common.kit.broker import Publisher
from common.kit.outbox import inbox
from common.kit.service import ServiceSpec
from common.kit.topology import Topology
from inventory_service.service import service as inventory
from inventory_service.store import DEMO_CATALOGUE, StockStore, reservations, stock
from tests.factories import make_line, make_order
from tests.integration.support import StartService, wait_for

pytestmark = pytest.mark.integration

ORDERS = 200
SKUS = [f"REPLICA-{n}" for n in range(5)]


def counting_spec(calls: Counter[str], replica: str) -> ServiceSpec[Any]:
    """The inventory service as deployed, its handler counting the calls of this replica."""
    spec = inventory.spec()
    reserve_stock = spec.handlers[OrderPlaced]

    async def reserve_and_count(event: OrderPlaced, delivery: Any) -> Sequence[Event]:
        calls[replica] += 1
        return await reserve_stock(event, delivery)

    return dataclasses.replace(spec, handlers={OrderPlaced: reserve_and_count})


async def sink(channel: aio_pika.abc.AbstractChannel, topology: Topology,
               event: type[Event]) -> aio_pika.abc.AbstractQueue:
    """A queue of the test's own on an outcome exchange: the relay's mandatory publishes
    need one bound (nothing else consumes outcomes here), and the test reads them."""
    exchange = await topology.declare_event_exchange(channel, event)
    queue = await channel.declare_queue(f"{topology.prefix}test-sink.{event.routing}",
                                        exclusive=True)
    await queue.bind(exchange)
    return queue


async def drain(queue: aio_pika.abc.AbstractQueue, into: list[dict[str, Any]]) -> None:
    """Move every message waiting in `queue` into `into`, decoded."""
    while (message := await queue.get(fail=False)) is not None:
        into.append(json.loads(message.body))
        await message.ack()


async def test_two_replicas_sharing_a_database_and_a_queue_give_one_effect_per_event(
        postgres_db_url: str, start_service: StartService,
        amqp: aio_pika.abc.AbstractRobustConnection) -> None:
    """Two inventory replicas (one PostgreSQL schema, one queue) compete for 200 orders, each
    published twice: every order is reserved exactly once, the stock drops by exactly the
    units ordered, both replicas did part of the work, and every second copy was acked as a
    duplicate (one "handled" and one "duplicate" receipt per event), with nothing retried
    or dead-lettered.

    Half the copies follow their original at once, so the two replicas race for the same
    event (the inbox key decides); the other half come after everything else, so the copy
    finds the event already handled.
    """
    # `postgres_db_url` comes first in the signature: set up before the services, dropped
    # after they stopped.
    calls: Counter[str] = Counter()
    # Started at once: both create the tables and seed the catalogue concurrently.
    first, _ = await asyncio.gather(*(
        start_service(counting_spec(calls, name), inventory.settings_class,
                      database_url=postgres_db_url)
        for name in ("first", "second")))
    topology = first.topology
    channel = await amqp.channel()
    queue_name = topology.queue(inventory.name, OrderPlaced)
    shared = await channel.declare_queue(queue_name, passive=True)
    assert shared.declaration_result.consumer_count == 2, "both replicas consume one queue"
    outcomes = {cls: await sink(channel, topology, cls)
                for cls in (StockReserved, StockReservationFailed)}
    audit = await channel.declare_queue(topology.audit_queue, passive=True)

    rng = random.Random(3)  # noqa: S311 - test data, not cryptography
    orders = [make_order(*(make_line(sku, rng.randint(1, 3))
                           for sku in rng.sample(SKUS, rng.randint(1, 3))))
              for _ in range(ORDERS)]
    ordered: Counter[str] = Counter()
    for order in orders:
        for line in order.lines:
            ordered[line.sku] += line.quantity
    # Exactly the units ordered: a second reservation of any order would fail another one.
    async with first.engine.begin() as conn:
        for sku in SKUS:
            await StockStore(conn).set_stock(sku, ordered[sku])

    publisher = Publisher(amqp, topology)
    for n, order in enumerate(orders):
        await publisher.publish(order)
        if n % 2 == 0:
            await publisher.publish(order)  # the copy right behind: the replicas race for it
    for order in orders[1::2]:
        await publisher.publish(order)  # the copy long after: the event is already handled

    receipts: list[dict[str, Any]] = []
    published_outcomes: dict[type[Event], list[dict[str, Any]]] = defaultdict(list)
    ours = {str(order.event_id) for order in orders}

    async def every_copy_answered() -> bool:
        await drain(audit, receipts)
        for cls, queue in outcomes.items():
            await drain(queue, published_outcomes[cls])
        answered = {r["event_id"] for r in _single(receipts) if r["handled_event_id"] in ours}
        return len(answered) >= 2 * ORDERS

    await wait_for(every_copy_answered, timeout=60, interval=0.2,
                   what=f"receipts for the {2 * ORDERS} deliveries")

    # One effect per order: its reservation is exactly its lines, nothing more.
    async with first.engine.connect() as conn:
        held: dict[uuid.UUID, dict[str, int]] = defaultdict(dict)
        for row in (await conn.execute(sa.select(reservations))).all():
            held[row.order_id][row.sku] = row.quantity
        levels = {row.sku: row for row in (await conn.execute(sa.select(stock))).all()}
        handled_records = await conn.scalar(
            sa.select(sa.func.count()).select_from(inbox).where(inbox.c.queue == queue_name))
    assert held == {order.order_id: _units(order) for order in orders}
    for sku in SKUS:
        assert (levels[sku].on_hand, levels[sku].reserved) == (ordered[sku], ordered[sku])
    assert {sku: levels[sku].on_hand for sku in DEMO_CATALOGUE} == DEMO_CATALOGUE
    assert handled_records == ORDERS

    # Both replicas worked. The handler ran at least once per event; more only where a batch
    # was rolled back (the replicas' row locks can deadlock across a batch, and PostgreSQL
    # aborts one) and its deliveries were handled again one by one: the effects above are
    # what counts, and they are there once.
    assert calls["first"] > 0
    assert calls["second"] > 0
    assert calls["first"] + calls["second"] >= ORDERS

    # Every event: one copy handled, the other acked as a duplicate; nothing retried.
    by_event: dict[str, Counter[str]] = defaultdict(Counter)
    for receipt in {r["event_id"]: DeliveryReceipt.model_validate(r)
                    for r in _single(receipts)}.values():
        if receipt.handled_event_id in ours:
            by_event[receipt.handled_event_id][receipt.outcome] += 1
    assert {event_id: dict(c) for event_id, c in by_event.items()} == {
        event_id: {"handled": 1, "duplicate": 1} for event_id in ours}

    # One StockReserved per order, none failed (a relay may publish a row twice: the
    # downstream inbox dedupes by event id, so count distinct events).
    reserved_events = {e["event_id"]: e for e in published_outcomes[StockReserved]}
    assert sorted(e["order_id"] for e in reserved_events.values()) == sorted(
        str(order.order_id) for order in orders)
    assert published_outcomes[StockReservationFailed] == []
    dlq = await channel.declare_queue(topology.dlq(queue_name), passive=True)
    assert dlq.declaration_result.message_count == 0


def _single(audit: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The receipts among audit messages, a batch's (DeliveryReceipts) unpacked."""
    found: list[dict[str, Any]] = []
    for payload in audit:
        if payload["event_type"] == "DeliveryReceipt":
            found.append(payload)
        elif payload["event_type"] == "DeliveryReceipts":
            found.extend(payload["receipts"])
    return found


def _units(order: OrderPlaced) -> dict[str, int]:
    units: Counter[str] = Counter()
    for line in order.lines:
        units[line.sku] += line.quantity
    return dict(units)
