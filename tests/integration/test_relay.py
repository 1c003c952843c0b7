"""The outbox relay on a real broker: a stuck event holds up only its own order's events."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import aio_pika
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import Event, ReservedLine, StockReserved
from common.outbox import outbox
from tests.factories import make_order
from tests.integration.support import StartService, wait_for
from tests.integration.test_kit import PROBE, effect_count

pytestmark = pytest.mark.integration


async def test_an_unroutable_event_waits_without_blocking_other_orders(
        start_service: StartService, amqp: aio_pika.abc.AbstractConnection) -> None:
    """Order A's first event has no queue yet: A's next event waits behind it, B flows.

    Once a queue is bound, A's events go out in the order they were committed.
    """
    runtime = await start_service(PROBE)
    order_a, order_b = make_order(), make_order()
    stuck = StockReserved(order_id=order_a.order_id, correlation_id=str(order_a.order_id),
                          lines=(ReservedLine(sku="SKU-1", quantity=1),))

    async def commit(*events: Event) -> None:
        async def work(_conn: AsyncConnection) -> Sequence[Event]:
            return list(events)

        await runtime.execute(work)

    await commit(stuck, order_a)
    await commit(order_b)
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

    async def work(_conn: AsyncConnection) -> Sequence[Event]:
        return events

    await runtime.execute(work)
    received: list[str] = []

    async def drain() -> bool:
        message = await watch.get(fail=False)
        if message is not None:
            await message.ack()
            received.append(str(message.message_id))
        return len(received) == len(events)

    await wait_for(drain, what="all 20 events")
    assert received == [str(e.event_id) for e in events]
