"""The kit on a real RabbitMQ: delivery, dead letters, dedupe, unroutable, declaration clashes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import (
    DeliveryReceipt,
    Event,
    OrderPlaced,
    ReservedLine,
    StockReserved,
)
from common.kit.broker import Publisher, UnroutableError, message_for
from common.kit.runner import Runtime, ServiceRunner
from common.kit.service import ServiceSpec
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology, TopologyError
from tests.factories import make_order
from tests.integration.support import (
    StartService,
    delete_topology,
    receipts_in,
    settings_for,
    wait_for,
)

pytestmark = pytest.mark.integration

probe_metadata = MetaData()
effects = Table(
    "probe_effects", probe_metadata,
    Column("id", Integer, primary_key=True),
    Column("order_id", String(36), nullable=False),
)


class ProbeStore:
    """A subscriber's store that records one row per effect."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def record(self, order_id: uuid.UUID) -> None:
        await self.conn.execute(insert(effects).values(order_id=str(order_id)))


async def record_order(event: OrderPlaced, store: ProbeStore) -> Sequence[Event]:
    if event.customer_id == "explode":
        raise RuntimeError("the probe refuses this customer")
    await store.record(event.order_id)
    return []


# The probes publish the tests' events from their own outboxes (`publish`), so they
# produce them.
PROBE = ServiceSpec(name="probe", handlers={OrderPlaced: record_order}, store=ProbeStore,
                    metadata=probe_metadata, produces=(OrderPlaced, StockReserved))


def an_order(customer: str = "cust-1") -> OrderPlaced:
    return make_order(customer=customer, producer="test")


async def effect_count(runtime: Runtime[Any], order_id: uuid.UUID | None = None) -> int:
    query = select(func.count()).select_from(effects)
    if order_id is not None:
        query = query.where(effects.c.order_id == str(order_id))
    async with runtime.engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def publish(runtime: Runtime[Any], *events: Event) -> None:
    async def work(_conn: AsyncConnection) -> Sequence[Event]:
        return list(events)

    await runtime.execute(work)


async def dlq_messages(broker: aio_pika.abc.AbstractConnection, queue: str,
                       expected: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Fetch (and ack) `expected` messages from `<queue>.dlq`, polling with a deadline."""
    channel = await broker.channel()
    dlq = await channel.declare_queue(f"{queue}.dlq", passive=True)
    got: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def fetch() -> bool:
        message = await dlq.get(fail=False)
        if message is not None:
            await message.ack()
            got.append(message)
        return len(got) >= expected

    await wait_for(fetch, what=f"{expected} dead letters in {dlq.name}")
    return got


async def test_an_event_reaches_a_subscriber_once(start_service: StartService) -> None:
    """An OrderPlaced published through the outbox is handled once by the subscriber."""
    runtime = await start_service(PROBE)
    order = an_order()
    await publish(runtime, order)
    await wait_for(lambda: effect_count(runtime, order.order_id), what="the effect")
    assert await effect_count(runtime, order.order_id) == 1


async def test_a_copy_after_the_original_was_committed_has_no_second_effect(
        start_service: StartService, amqp: aio_pika.abc.AbstractConnection) -> None:
    """A copy that arrives after its original was handled and committed is a duplicate by
    the inbox's record alone: acked, receipted `duplicate`, no second effect."""
    runtime = await start_service(PROBE)
    order = an_order()
    await publish(runtime, order)
    [first] = await audit_receipts(amqp, runtime, str(order.event_id), 1)
    assert first.outcome == "handled"
    await publish(runtime, order)  # a new outbox row, the same event_id
    [copy] = await audit_receipts(amqp, runtime, str(order.event_id), 1)
    assert copy.outcome == "duplicate"
    assert await effect_count(runtime, order.order_id) == 1


async def test_a_copy_after_a_restart_has_no_second_effect(
        amqp_url: str, management_url: str, name_prefix: str, tmp_path: Path,
        amqp: aio_pika.abc.AbstractRobustConnection) -> None:
    """The inbox outlives the process: a copy delivered to the next run of the service, on
    the same database, is a duplicate with no second effect."""
    settings = settings_for(ServiceSettings, amqp_url, name_prefix, tmp_path)
    runners = [ServiceRunner(PROBE, settings, broker_wait=10) for _ in range(2)]
    try:
        runtime = await runners[0].__aenter__()
        order = an_order()
        await publish(runtime, order)
        [first] = await audit_receipts(amqp, runtime, str(order.event_id), 1)
        assert first.outcome == "handled"
        await runners[0].stop()

        runtime = await runners[1].__aenter__()
        await publish(runtime, order)
        [copy] = await audit_receipts(amqp, runtime, str(order.event_id), 1)
        assert copy.outcome == "duplicate"
        assert await effect_count(runtime, order.order_id) == 1
    finally:
        for runner in runners:
            await runner.stop()
        await delete_topology(amqp_url, [r.topology for r in runners], name_prefix,
                              management_url)


async def test_malformed_and_wrong_schema_messages_are_dead_lettered(
        start_service: StartService, amqp: aio_pika.abc.AbstractConnection) -> None:
    """Bad JSON and a schema mismatch land in the DLQ with the reason; later ones still flow."""
    runtime = await start_service(PROBE)
    queue = runtime.topology.queue("probe", OrderPlaced)
    channel = await amqp.channel()
    exchange = await channel.get_exchange(runtime.topology.exchange(OrderPlaced))
    await exchange.publish(aio_pika.Message(b"{not json", message_id="bad-json"), routing_key="")
    wrong = json.loads(an_order().model_dump_json())
    wrong["lines"][0]["quantity"] = 0
    await exchange.publish(aio_pika.Message(json.dumps(wrong).encode(), message_id="bad-schema"),
                           routing_key="")
    good = an_order()
    await publish(runtime, good)

    await wait_for(lambda: effect_count(runtime, good.order_id), what="the good order")
    dead = await dlq_messages(amqp, queue, 2)
    by_id = {m.message_id: m for m in dead}
    assert by_id["bad-json"].body == b"{not json"
    assert by_id["bad-json"].headers["x-error-reason"] == "poison"
    assert "not valid JSON" in str(by_id["bad-json"].headers["x-exception-message"])
    assert "lines.0.quantity" in str(by_id["bad-schema"].headers["x-exception-message"])
    assert by_id["bad-schema"].headers["x-original-queue"] == queue


async def test_a_handler_that_always_fails_is_retried_then_dead_lettered(
        start_service: StartService, amqp: aio_pika.abc.AbstractConnection) -> None:
    """Each retry waits in a delay queue; after the last, the DLQ holds it with the reason."""
    runtime = await start_service(PROBE)
    queue = runtime.topology.queue("probe", OrderPlaced)
    bad, good = an_order("explode"), an_order()
    await publish(runtime, bad, good)
    await wait_for(lambda: effect_count(runtime, good.order_id), what="the good order")
    (dead,) = await dlq_messages(amqp, queue, 1)
    assert dead.message_id == str(bad.event_id)
    assert dead.headers["x-error-reason"] == "retries_exhausted"
    assert dead.headers["x-exception-type"] == "RuntimeError"
    assert "the probe refuses" in str(dead.headers["x-exception-message"])
    assert dead.headers["x-attempts"] == 3  # the first try and two retries
    assert dead.headers["x-service"] == "probe"
    assert str(dead.headers["x-first-failed-at"]) <= str(dead.headers["x-failed-at"])
    assert OrderPlaced.model_validate_json(dead.body) == bad
    assert await effect_count(runtime, bad.order_id) == 0


FLAKY_FAILURES: dict[uuid.UUID, int] = {}


async def flaky(event: OrderPlaced, store: ProbeStore) -> Sequence[Event]:
    """Fails the first two deliveries of each order, then records it."""
    seen = FLAKY_FAILURES.get(event.order_id, 0)
    if seen < 2:
        FLAKY_FAILURES[event.order_id] = seen + 1
        raise ConnectionError(f"downstream unavailable (failure {seen + 1})")
    await store.record(event.order_id)
    return []


FLAKY = ServiceSpec(name="flaky", handlers={OrderPlaced: flaky}, store=ProbeStore,
                    metadata=probe_metadata, produces=(OrderPlaced,))


async def test_a_handler_that_fails_twice_then_succeeds_is_handled_once_after_growing_delays(
        start_service: StartService, amqp: aio_pika.abc.AbstractConnection) -> None:
    """Fails k=2 times, then succeeds: one effect; the waits between attempts grow."""
    runtime = await start_service(FLAKY)
    order = an_order()
    await publish(runtime, order)
    await wait_for(lambda: effect_count(runtime, order.order_id), what="the effect",
                   timeout=15)
    receipts = await audit_receipts(amqp, runtime, str(order.event_id), 3)
    assert [r.outcome for r in receipts] == ["retried", "retried", "handled"]
    assert [r.attempt for r in receipts[:2]] == [1, 2]
    first_wait = (receipts[1].received_at - receipts[0].received_at).total_seconds()
    second_wait = (receipts[2].received_at - receipts[1].received_at).total_seconds()
    # Each wait is at least its own delay (0.2 s, then 0.6 s), so they grow; a busy
    # machine may stretch either one, so they are not compared with each other.
    assert first_wait >= 0.2
    assert second_wait >= 0.6
    assert await effect_count(runtime, order.order_id) == 1


async def audit_receipts(broker: aio_pika.abc.AbstractConnection, runtime: Runtime[Any],
                         event_id: str, expected: int) -> list[DeliveryReceipt]:
    """The receipts for one event on the audit queue, in arrival order."""
    channel = await broker.channel()
    audit = await channel.declare_queue(runtime.topology.audit_queue, passive=True)
    found: list[DeliveryReceipt] = []

    async def collect() -> bool:
        message = await audit.get(fail=False)
        if message is not None:
            await message.ack()
            found.extend(r for r in receipts_in(message) if r.handled_event_id == event_id)
        return len(found) >= expected

    await wait_for(collect, what=f"{expected} receipts for {event_id}", timeout=15)
    return sorted(found, key=lambda r: r.received_at)


async def test_receipts_say_what_each_delivery_became(
        start_service: StartService, amqp: aio_pika.abc.AbstractConnection) -> None:
    """Handled and dead-lettered deliveries each leave a receipt on the audit queue."""
    runtime = await start_service(PROBE)
    good, bad = an_order(), an_order("explode")
    await publish(runtime, good, bad)
    channel = await amqp.channel()
    audit = await channel.declare_queue(runtime.topology.audit_queue, passive=True)
    receipts: dict[str, DeliveryReceipt] = {}

    async def collect() -> bool:
        message = await audit.get(fail=False)
        if message is not None:
            await message.ack()
            for receipt in receipts_in(message):
                receipts[receipt.handled_event_id or "?"] = receipt
        return {str(good.event_id), str(bad.event_id)} <= receipts.keys()

    await wait_for(collect, what="two receipts")
    assert receipts[str(good.event_id)].outcome == "handled"
    assert receipts[str(good.event_id)].subscriber == "probe"
    assert receipts[str(good.event_id)].correlation_id == str(good.order_id)
    assert receipts[str(bad.event_id)].outcome == "retried"  # its first failure
    assert receipts[str(bad.event_id)].attempt == 1
    assert "the probe refuses" in (receipts[str(bad.event_id)].error or "")


async def test_an_unroutable_publish_raises(amqp_url: str, management_url: str,
                                            name_prefix: str,
                                            amqp: aio_pika.abc.AbstractRobustConnection
                                            ) -> None:
    """A persistent, mandatory publish with no queue bound raises instead of vanishing."""
    topology = Topology(name_prefix)
    publisher = Publisher(amqp, topology)
    event = StockReserved(order_id=uuid.uuid4(), lines=(ReservedLine(sku="A", quantity=1),),
                          correlation_id="x")
    try:
        with pytest.raises(UnroutableError, match="no queue is bound"):
            await publisher.publish(event)
    finally:
        await delete_topology(amqp_url, [topology], name_prefix, management_url)


async def test_the_message_carries_the_envelope_in_its_properties() -> None:
    """message_id, type, correlation_id, timestamp, app_id and persistence come from the event."""
    event = an_order()
    message = message_for(event)
    assert message.message_id == str(event.event_id)
    assert message.type == "OrderPlaced"
    assert message.correlation_id == str(event.order_id)
    assert message.app_id == "test"
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.timestamp is not None


async def test_a_declaration_clash_stops_with_a_clear_error(
        amqp_url: str, management_url: str, name_prefix: str,
        amqp: aio_pika.abc.AbstractRobustConnection) -> None:
    """A queue that exists with other arguments gives an error naming it and how to migrate."""
    topology = Topology(name_prefix)
    name = topology.queue("probe", OrderPlaced)
    channel = await amqp.channel()
    await channel.declare_queue(name, durable=True, arguments={"x-max-length": 10})
    topology.declared_queues.append(name)
    try:
        with pytest.raises(TopologyError) as caught:
            await topology.declare_queue(await amqp.channel(), name, {})
        message = str(caught.value)
        assert repr(name) in message
        assert "x-max-length" in message or "x-queue-type" in message
        assert "To migrate" in message
    finally:
        await delete_topology(amqp_url, [topology], name_prefix, management_url)


async def test_a_queue_left_without_its_consumer_is_resubscribed(
        amqp_url: str, management_url: str, name_prefix: str, tmp_path: Path,
        amqp: aio_pika.abc.AbstractRobustConnection) -> None:
    """If our consumer disappears while the channel lives (aio-pika #231, #626), the
    watchdog notices the empty queue and subscribes again; deliveries resume."""
    runner = ServiceRunner(PROBE, settings_for(ServiceSettings, amqp_url, name_prefix, tmp_path),
                           broker_wait=10)
    runtime = await runner.__aenter__()
    try:
        queue_name = runtime.topology.queue("probe", OrderPlaced)
        _channel, queue, tag = runner._consumers[queue_name]
        await queue.cancel(tag)  # the consumer is gone; the channel and connection stay up

        async def consumers() -> int:
            channel = await amqp.channel()
            declared = await channel.declare_queue(queue_name, passive=True)
            await channel.close()
            return int(declared.declaration_result.consumer_count or 0)

        await wait_for(consumers, what="the watchdog to re-subscribe", timeout=10)
        order = an_order()
        await publish(runtime, order)
        await wait_for(lambda: effect_count(runtime, order.order_id), what="a delivery")
    finally:
        await runner.stop()
        await delete_topology(amqp_url, [runner.topology], name_prefix, management_url)


RELEASE = asyncio.Event()


async def slow(event: OrderPlaced, store: ProbeStore) -> Sequence[Event]:
    """Waits for the test to release it, then records the order."""
    await RELEASE.wait()
    await store.record(event.order_id)
    return []


SLOW = ServiceSpec(name="slow", handlers={OrderPlaced: slow}, store=ProbeStore,
                   metadata=probe_metadata, produces=(OrderPlaced,))


@pytest.mark.parametrize("finishes_in_time", [True, False])
async def test_stopping_lets_in_flight_handlers_finish_or_returns_their_delivery(
        amqp_url: str, management_url: str, name_prefix: str, tmp_path: Path,
        amqp: aio_pika.abc.AbstractRobustConnection, finishes_in_time: bool) -> None:
    """On stop, a handler that finishes within the timeout is committed and acked; one that
    does not is cancelled and its delivery goes back to the queue, not lost."""
    RELEASE.clear()
    settings = settings_for(ServiceSettings, amqp_url, name_prefix, tmp_path,
                            shutdown_timeout=2.0 if finishes_in_time else 0.3)
    runner = ServiceRunner(SLOW, settings, broker_wait=10)
    runtime = await runner.__aenter__()
    queue_name = runtime.topology.queue("slow", OrderPlaced)
    try:
        order = an_order()
        await publish(runtime, order)
        await wait_for(lambda: _true(bool(runner._in_flight)), what="the handler to start")
        if finishes_in_time:
            asyncio.get_running_loop().call_later(0.2, RELEASE.set)
        await runner.stop()
        assert await effect_count(runtime, order.order_id) == (1 if finishes_in_time else 0)

        async def ready() -> int:
            channel = await amqp.channel()
            declared = await channel.declare_queue(queue_name, passive=True)
            await channel.close()
            return int(declared.declaration_result.message_count or 0)

        if finishes_in_time:
            assert await ready() == 0
        else:
            assert await wait_for(ready, what="the delivery back in its queue") == 1
    finally:
        RELEASE.set()
        await runtime.engine.dispose()  # effect_count reconnected after stop()
        await delete_topology(amqp_url, [runner.topology], name_prefix, management_url)


async def _true(value: bool) -> bool:
    return value
