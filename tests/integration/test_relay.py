"""The outbox relay on a real broker: a stuck or refused event holds up only its own order's
events and goes out once it can; receipts travel in bounded messages."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import DeliveryReceipt, DeliveryReceipts, Event, ReservedLine, StockReserved
from common.kit.outbox import outbox
from common.kit.runner import Runtime
from tests.factories import make_order
from tests.integration.support import StartService, receipts_in, wait_for
from tests.integration.test_kit import PROBE, effect_count

pytestmark = pytest.mark.integration


async def commit(runtime: Runtime[Any], *events: Event) -> None:
    """Commit `events` to the outbox in one transaction, as a handler's would be."""
    async def work(_conn: AsyncConnection) -> Sequence[Event]:
        return list(events)

    await runtime.execute(work)


async def outbox_row(runtime: Runtime[Any], event: Event) -> Any:
    async with runtime.engine.connect() as conn:
        return (await conn.execute(select(outbox).where(
            outbox.c.event_id == str(event.event_id)))).one()


async def test_an_unroutable_event_waits_without_blocking_other_orders(
        start_service: StartService, amqp: aio_pika.abc.AbstractConnection) -> None:
    """Without a history kept, order A's first event has no queue yet: A's next event waits
    behind it, B flows.

    Once a queue is bound, A's events go out in the order they were committed.
    """
    runtime = await start_service(PROBE, history=False)
    order_a, order_b = make_order(), make_order()
    stuck = StockReserved(order_id=order_a.order_id, correlation_id=str(order_a.order_id),
                          lines=(ReservedLine(sku="SKU-1", quantity=1),))
    await commit(runtime, stuck, order_a)
    await commit(runtime, order_b)
    await wait_for(lambda: effect_count(runtime, order_b.order_id), what="order B's effect")
    assert await effect_count(runtime, order_a.order_id) == 0

    async def stuck_row_retried() -> bool:
        async with runtime.engine.connect() as conn:
            row = (await conn.execute(select(outbox.c.attempts, outbox.c.last_error).where(
                outbox.c.event_id == str(stuck.event_id)))).one()
        return row.attempts >= 1 and "no queue is bound" in (row.last_error or "")

    await wait_for(stuck_row_retried, what="the unroutable row to record its failure")

    channel = await amqp.channel()
    late = await channel.declare_queue(f"{runtime.topology.prefix}late.stock.reserved",
                                       exclusive=True)
    await late.bind(runtime.topology.exchange(StockReserved))
    await wait_for(lambda: effect_count(runtime, order_a.order_id), timeout=15,
                   what="order A's effect once its first event could go out")
    message = await late.get(fail=False)
    assert message is not None
    assert message.message_id == str(stuck.event_id)
    await message.ack()


async def test_an_event_nobody_subscribes_to_yet_is_kept_in_its_history(
        start_service: StartService, amqp: aio_pika.abc.AbstractConnection) -> None:
    """With the history kept (the default), an event without a subscriber queue is published
    all the same, into its history, and holds up nothing of its order."""
    runtime = await start_service(PROBE)
    order = make_order()
    kept = StockReserved(order_id=order.order_id, correlation_id=str(order.order_id),
                         lines=(ReservedLine(sku="SKU-1", quantity=1),))
    await commit(runtime, kept, order)
    await wait_for(lambda: effect_count(runtime, order.order_id), what="the order's effect")
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=10)
    history = await channel.declare_queue(runtime.topology.history_stream(StockReserved),
                                          passive=True)
    read: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await history.consume(read.put, arguments={"x-stream-offset": "first"})
    message = await asyncio.wait_for(read.get(), 10)
    assert message.message_id == str(kept.event_id)
    await channel.close()


async def test_events_of_one_order_are_published_in_commit_order(
        start_service: StartService, amqp: aio_pika.abc.AbstractConnection) -> None:
    """Several events of one order in one batch arrive in the order they were committed."""
    runtime = await start_service(PROBE)
    channel = await amqp.channel()
    watch = await channel.declare_queue(f"{runtime.topology.prefix}watch.stock.reserved",
                                        exclusive=True)
    exchange = await channel.declare_exchange(runtime.topology.exchange(StockReserved),
                                              aio_pika.ExchangeType.FANOUT, durable=True)
    runtime.topology.declared_exchanges.append(exchange.name)
    await watch.bind(exchange)
    order_id = uuid.uuid4()
    events = [StockReserved(order_id=order_id, correlation_id=str(order_id),
                            lines=(ReservedLine(sku=f"SKU-{n}", quantity=n),))
              for n in range(1, 21)]
    await commit(runtime, *events)
    received: list[str] = []

    async def drain() -> bool:
        message = await watch.get(fail=False)
        if message is not None:
            await message.ack()
            received.append(str(message.message_id))
        return len(received) == len(events)

    await wait_for(drain, what="all 20 events")
    assert received == [str(e.event_id) for e in events]


async def test_a_publish_the_broker_refuses_stays_unsent_until_the_broker_accepts_it(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection) -> None:
    """A queue bound to the exchange that is full with `x-overflow: reject-publish` makes the
    broker nack the publish: the row stays unsent and is retried; once the queue is gone,
    it goes out."""
    runtime = await start_service(PROBE)
    channel = await amqp.channel()
    exchange = await channel.declare_exchange(runtime.topology.exchange(StockReserved),
                                              aio_pika.ExchangeType.FANOUT, durable=True)
    runtime.topology.declared_exchanges.append(exchange.name)
    watch = await channel.declare_queue(f"{runtime.topology.prefix}watch.stock.reserved",
                                        exclusive=True)
    await watch.bind(exchange)
    full = await channel.declare_queue(
        f"{runtime.topology.prefix}full.stock.reserved", exclusive=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    await full.bind(exchange)
    order_id = uuid.uuid4()
    event = StockReserved(order_id=order_id, correlation_id=str(order_id),
                          lines=(ReservedLine(sku="SKU-1", quantity=1),))
    await commit(runtime, event)

    async def refused_twice() -> bool:
        row = await outbox_row(runtime, event)
        assert row.sent_at is None, "a publish the broker refused was marked sent"
        return bool(row.attempts >= 2)

    await wait_for(refused_twice, what="the relay to be refused twice")
    await full.delete(if_unused=False, if_empty=False)

    async def sent() -> bool:
        return (await outbox_row(runtime, event)).sent_at is not None

    await wait_for(sent, timeout=15, what="the row to go out once the broker accepts it")
    row = await outbox_row(runtime, event)
    assert "Nack" in (row.last_error or ""), "the broker's refusal was recorded"
    # Each refused publish still reached the queues with room: at least once, by event id.
    message = await watch.get(fail=False)
    assert message is not None
    assert message.message_id == str(event.event_id)
    await channel.close()


async def test_receipts_waiting_together_go_out_in_messages_of_bounded_size(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection) -> None:
    """Stored receipts of 800 deliveries, flushed together, arrive whole and once, in
    several messages of at most 256 KiB each, far below the smallest message limit."""
    runtime = await start_service(PROBE)
    now = datetime.now(UTC)
    rows = [DeliveryReceipts(subscriber="probe", queue="q", producer="probe", receipts=tuple(
        DeliveryReceipt(subscriber="probe", queue="q", handled_event_id=str(uuid.uuid4()),
                        handled_event_type="OrderPlaced", outcome="handled",
                        received_at=now, duration_ms=1.0, producer="probe")
        for _ in range(200))) for _ in range(4)]
    await commit(runtime, *rows)
    channel = await amqp.channel()
    audit = await channel.declare_queue(runtime.topology.audit_queue, passive=True)
    sizes: list[int] = []
    found: list[str | None] = []

    async def collect() -> bool:
        while (message := await audit.get(fail=False)) is not None:
            await message.ack()
            if receipts := receipts_in(message):
                sizes.append(len(message.body))
                found.extend(r.handled_event_id for r in receipts)
        return len(found) >= 800

    await wait_for(collect, what="800 receipts")
    assert sorted(found, key=str) == sorted(
        (r.handled_event_id for row in rows for r in row.receipts), key=str)
    assert len(sizes) >= 2
    assert max(sizes) <= 256 * 1024, sizes
    await channel.close()
