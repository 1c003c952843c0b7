"""Deliveries that wait on a queue are handled in batches, with a single delivery's guarantees.

Each test preloads the subscriber's queue before the service starts, so the runner meets a
backlog and batches it: one transaction, one receipts message and one ack per batch.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from common.events import DeliveryReceipt, Event, OrderPlaced
from common.kit.broker import Publisher
from common.kit.runner import Runtime, ServiceRunner
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from tests.integration.support import (
    StartService,
    delete_topology,
    receipts_in,
    settings_for,
    wait_for,
)
from tests.integration.test_kit import PROBE, an_order, effect_count

pytestmark = pytest.mark.integration


async def preload(amqp: aio_pika.abc.AbstractRobustConnection, prefix: str,
                  events: list[Event]) -> None:
    """Declare the probe's queue as the service will, and publish `events` into it."""
    topology = Topology(prefix, retry_delays=(0.2, 0.6))
    channel = await amqp.channel()
    exchange = await topology.declare_event_exchange(channel, OrderPlaced)
    await topology.declare_subscriber_queue(channel, topology.queue(PROBE.name, OrderPlaced),
                                            exchange)
    await channel.close()
    publisher = Publisher(amqp, topology)
    for event in events:
        await publisher.publish(event)
    await publisher.close()


async def audit_messages(amqp: aio_pika.abc.AbstractRobustConnection, runtime: Runtime[Any],
                         until: int) -> tuple[list[int], list[DeliveryReceipt]]:
    """Drain the audit queue until `until` receipts arrived: (the body size of each message
    that carried any, receipts)."""
    channel = await amqp.channel()
    audit = await channel.declare_queue(runtime.topology.audit_queue, passive=True)
    found: list[DeliveryReceipt] = []
    carriers: list[int] = []  # the size of each message that carried receipts

    async def collect() -> bool:
        while (message := await audit.get(fail=False)) is not None:
            await message.ack()
            if receipts := receipts_in(message):
                carriers.append(len(message.body))
                found.extend(receipts)
        return len(found) >= until

    await wait_for(collect, what=f"{until} receipts", timeout=30)
    await channel.close()
    return carriers, found


async def test_a_backlog_is_handled_in_batches_with_one_receipts_message_each(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection,
        name_prefix: str) -> None:
    """200 waiting orders: each has one effect and one `handled` receipt, and the receipts
    come in far fewer messages than deliveries."""
    orders = [an_order() for _ in range(200)]
    await preload(amqp, name_prefix, list(orders))
    runtime = await start_service(PROBE, prefetch=64)
    messages, receipts = await audit_messages(amqp, runtime, until=len(orders))
    for order in orders:
        assert await effect_count(runtime, order.order_id) == 1
    assert Counter(r.handled_event_id for r in receipts) == Counter(
        str(o.event_id) for o in orders)
    assert {r.outcome for r in receipts} == {"handled"}
    assert len(messages) <= len(orders) // 4, f"{len(messages)} receipt messages for 200"


async def test_a_big_batch_sends_its_receipts_in_messages_of_at_most_256_kib(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection,
        name_prefix: str) -> None:
    """600 orders handled as one batch (their receipts take some 330 KB): the receipts come
    in messages of at most 256 KiB, below the smallest message size limit (512 KiB)."""
    orders = [an_order() for _ in range(600)]
    await preload(amqp, name_prefix, list(orders))
    runtime = await start_service(PROBE, prefetch=1200, batch_linger_ms=300)
    sizes, receipts = await audit_messages(amqp, runtime, until=len(orders))
    assert max(Counter(r.received_at for r in receipts).values()) > 500, "one big batch"
    assert len(sizes) >= 2
    assert max(sizes) <= 256 * 1024, sizes
    assert Counter(r.handled_event_id for r in receipts) == Counter(
        str(o.event_id) for o in orders)


async def test_one_failing_delivery_in_a_batch_leaves_the_others_committed_once(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection,
        name_prefix: str) -> None:
    """A handler failure in the middle of a batch rolls the batch back; the deliveries are
    then handled one by one: the good ones once each, the bad one retried on its own."""
    good = [an_order() for _ in range(40)]
    bad = an_order("explode")
    await preload(amqp, name_prefix, [*good[:20], bad, *good[20:]])
    runtime = await start_service(PROBE, prefetch=64)
    # 40 handled, then the bad one's failures: retried twice, then dead-lettered.
    _, receipts = await audit_messages(amqp, runtime, until=len(good) + 3)
    for order in good:
        assert await effect_count(runtime, order.order_id) == 1
    assert await effect_count(runtime, bad.order_id) == 0
    outcomes = Counter((r.handled_event_id, r.outcome) for r in receipts)
    assert {event_id for (event_id, outcome) in outcomes if outcome == "handled"} == {
        str(o.event_id) for o in good}
    assert all(n == 1 for (_, outcome), n in outcomes.items() if outcome == "handled")
    assert outcomes[(str(bad.event_id), "retried")] == 2
    assert outcomes[(str(bad.event_id), "dead_lettered")] == 1


async def test_the_same_event_twice_in_one_batch_has_one_effect(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection,
        name_prefix: str) -> None:
    """A duplicate right behind its original, in the same batch: one effect, and receipts
    saying handled then duplicate. (The batch drops the copy itself, before the inbox is
    asked; a copy meeting the inbox is the next test's.)"""
    twice = an_order()
    others = [an_order() for _ in range(10)]
    await preload(amqp, name_prefix, [*others[:5], twice, twice, *others[5:]])
    runtime = await start_service(PROBE, prefetch=64)
    _, receipts = await audit_messages(amqp, runtime, until=12)
    assert await effect_count(runtime, twice.order_id) == 1
    assert sorted(r.outcome for r in receipts if r.handled_event_id == str(twice.event_id)) \
        == ["duplicate", "handled"]


async def test_copies_in_a_batch_after_a_restart_have_no_second_effect(
        amqp_url: str, management_url: str, name_prefix: str, tmp_path: Path,
        amqp: aio_pika.abc.AbstractRobustConnection) -> None:
    """Orders handled and committed by one run of the service, then copies of them waiting
    among new orders for the next run: the batch's inbox claim finds the copies, which are
    duplicates with no second effect, and handles the new ones."""
    originals = [an_order() for _ in range(5)]
    fresh = [an_order() for _ in range(5)]
    await preload(amqp, name_prefix, list(originals))
    settings = settings_for(ServiceSettings, amqp_url, name_prefix, tmp_path, prefetch=64,
                            batch_linger_ms=300)
    runners = [ServiceRunner(PROBE, settings, broker_wait=10) for _ in range(2)]
    try:
        runtime = await runners[0].__aenter__()
        _, receipts = await audit_messages(amqp, runtime, until=len(originals))
        assert {r.outcome for r in receipts} == {"handled"}
        await runners[0].stop()

        await preload(amqp, name_prefix, [*fresh[:2], *originals, *fresh[2:]])
        runtime = await runners[1].__aenter__()
        _, receipts = await audit_messages(amqp, runtime, until=len(originals) + len(fresh))
        outcomes = {r.handled_event_id: r.outcome for r in receipts}
        assert outcomes == {**{str(o.event_id): "duplicate" for o in originals},
                            **{str(o.event_id): "handled" for o in fresh}}
        assert len({r.received_at for r in receipts}) == 1, "one batch"
        for order in [*originals, *fresh]:
            assert await effect_count(runtime, order.order_id) == 1
    finally:
        for runner in runners:
            await runner.stop()
        await delete_topology(amqp_url, [r.topology for r in runners], name_prefix,
                              management_url)


async def test_deliveries_arriving_within_the_linger_share_one_transaction(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection,
        name_prefix: str) -> None:
    """Five orders published one after the other, each awaiting its confirm (so they arrive
    milliseconds apart, never together): with a 500 ms linger they are handled as one batch,
    which the receipts show by sharing one arrival time."""
    runtime = await start_service(PROBE, batch_linger_ms=500)
    orders = [an_order() for _ in range(5)]
    publisher = Publisher(amqp, runtime.topology)
    for order in orders:
        await publisher.publish(order)
    await publisher.close()
    _messages, receipts = await audit_messages(amqp, runtime, until=len(orders))
    assert {r.outcome for r in receipts} == {"handled"}
    assert len({r.received_at for r in receipts}) == 1, [r.received_at for r in receipts]
    for order in orders:
        assert await effect_count(runtime, order.order_id) == 1
