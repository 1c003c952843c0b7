"""Hostile bodies on a real broker: each one is parked as poison on its own, at once, and the
valid deliveries of its batch are handled; a bug in one delivery's settling stays its own."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import model_validator

from common.events import OrderPlaced
from common.kit.runner import ServiceRunner, Subscription
from common.kit.service import ServiceSpec
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from tests.integration.support import StartService, delete_topology, settings_for, wait_for
from tests.integration.test_batches import audit_messages
from tests.integration.test_kit import PROBE, ProbeStore, an_order, effect_count, record_order

pytestmark = pytest.mark.integration


class ChokingOrderPlaced(OrderPlaced):
    """An OrderPlaced whose validation raises something other than ValidationError, as a
    model's validator may (pydantic passes such exceptions through)."""

    @model_validator(mode="after")
    def _choke(self) -> Self:
        if self.customer_id == "choke":
            raise LookupError("the model choked on this customer")
        return self


CHOKING = ServiceSpec(name="probe", handlers={ChokingOrderPlaced: record_order},
                      store=ProbeStore, metadata=PROBE.metadata)


async def preload_raw(amqp: AbstractRobustConnection, prefix: str,
                      messages: Sequence[aio_pika.Message], delivery_limit: int = 10) -> None:
    """Declare the probe's queue as the service will, and publish `messages` into it, each
    confirmed, before the service starts: it then meets them as one backlog."""
    topology = Topology(prefix, retry_delays=(0.2, 0.6), delivery_limit=delivery_limit)
    channel = await amqp.channel(publisher_confirms=True)
    exchange = await topology.declare_event_exchange(channel, OrderPlaced)
    await topology.declare_subscriber_queue(channel, topology.queue(PROBE.name, OrderPlaced),
                                            exchange)
    for message in messages:
        await exchange.publish(message, routing_key="")
    await channel.close()


def raw(body: bytes, message_id: str) -> aio_pika.Message:
    """A persistent message typed OrderPlaced, so the decoder's fast path tries it first."""
    return aio_pika.Message(body, message_id=message_id, type="OrderPlaced",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


def as_message(event: OrderPlaced) -> aio_pika.Message:
    return raw(event.model_dump_json().encode(), str(event.event_id))


async def drain_dlq(amqp: AbstractRobustConnection, queue: str, expected: int
                    ) -> dict[str, AbstractIncomingMessage]:
    """The dead letters of `queue` by message id: `expected` of them, then none more."""
    channel = await amqp.channel()
    dlq = await channel.declare_queue(f"{queue}.dlq", passive=True)
    got: dict[str, AbstractIncomingMessage] = {}

    async def fetch() -> bool:
        while (message := await dlq.get(fail=False)) is not None:
            await message.ack()
            got[str(message.message_id)] = message
        return len(got) >= expected

    await wait_for(fetch, what=f"{expected} dead letters in {dlq.name}", timeout=20)
    assert len(got) == expected, sorted(got)
    await channel.close()
    return got


async def queue_depth(amqp: AbstractRobustConnection, queue: str) -> int:
    channel = await amqp.channel()
    declared = await channel.declare_queue(queue, passive=True)
    await channel.close()
    return int(declared.declaration_result.message_count or 0)


#: A limit small enough for a test body, still above the kit's largest messages.
LIMIT = 512 * 1024


async def test_hostile_bodies_in_a_batch_are_parked_as_poison_and_the_rest_is_handled(
        start_service: StartService, amqp: AbstractRobustConnection, name_prefix: str) -> None:
    """Deep nesting, an oversized body, invalid UTF-8, a 5,000-digit number, a model that
    raises and plain junk, among valid orders in one batch: each bad one is parked at once as
    poison with its reason, each valid one is handled once, nothing meets the delivery limit."""
    good = [an_order() for _ in range(4)]
    order = json.loads(an_order().model_dump_json())
    huge_number = json.dumps({**order, "schema_version": 1}).replace(
        '"schema_version": 1', '"schema_version": 1' + "0" * 5000)
    padded = an_order().model_dump_json().encode()
    bad = {
        "nested": b"[" * 100_000,
        "oversized": padded + b" " * (LIMIT + 1 - len(padded)),  # a valid order, too big
        "bad-utf8": b'{"event_type": "OrderPlaced", "customer_id": "\xff\xfe"}',
        "huge-number": huge_number.encode(),
        "choke": an_order("choke").model_dump_json().encode(),
        "not-json": b"{not json",
    }
    await preload_raw(amqp, name_prefix, [
        as_message(good[0]), raw(bad["nested"], "nested"), as_message(good[1]),
        raw(bad["oversized"], "oversized"), raw(bad["bad-utf8"], "bad-utf8"),
        raw(bad["huge-number"], "huge-number"), as_message(good[2]),
        raw(bad["choke"], "choke"), raw(bad["not-json"], "not-json"), as_message(good[3]),
    ])
    # A long linger, so the whole backlog shares one batch.
    runtime = await start_service(CHOKING, prefetch=64, batch_linger_ms=300,
                                  max_message_bytes=LIMIT)
    queue = runtime.topology.queue("probe", OrderPlaced)

    _, receipts = await audit_messages(amqp, runtime, until=len(good) + len(bad))
    handled = [r for r in receipts if r.outcome == "handled"]
    assert Counter(r.handled_event_id for r in handled) == Counter(
        str(o.event_id) for o in good)
    assert len({r.received_at for r in handled}) == 1, "the valid orders shared one batch"
    for event in good:
        assert await effect_count(runtime, event.order_id) == 1
    parked = {r.handled_event_id: r for r in receipts if r.outcome == "dead_lettered"}
    assert parked.keys() == bad.keys()
    assert all(r.attempt == 1 for r in parked.values())

    dead = await drain_dlq(amqp, queue, len(bad))
    assert dead.keys() == bad.keys()
    for message_id, message in dead.items():
        headers = message.headers
        assert headers["x-error-reason"] == "poison", message_id
        assert headers["x-attempts"] == 1, message_id
        assert "x-death" not in headers, f"{message_id} was dead-lettered by the broker"
        assert message.body == bad[message_id], "parked as it came"
    reasons = {i: str(m.headers["x-exception-message"]) for i, m in dead.items()}
    assert "recursion" in reasons["nested"]
    assert f"{LIMIT + 1:,} bytes" in reasons["oversized"]
    assert f"{LIMIT:,}" in reasons["oversized"]
    assert dead["oversized"].headers["x-exception-type"] == "MessageTooLargeError"
    assert "not valid JSON" in reasons["bad-utf8"]
    assert "not valid JSON" in reasons["huge-number"]
    assert "LookupError" in reasons["choke"]
    assert "choked" in reasons["choke"]
    assert "not valid JSON" in reasons["not-json"]
    assert await queue_depth(amqp, queue) == 0


class ParkingBugRunner(ServiceRunner[ProbeStore]):
    """A runner with a bug in parking one particular delivery: its `_fail` raises."""

    async def _fail(self, sub: Subscription[ProbeStore], message: AbstractIncomingMessage,
                    **kwargs: Any) -> str:
        if message.message_id == "bug":
            raise RuntimeError("a bug of ours while parking this delivery")
        return await super()._fail(sub, message, **kwargs)


async def test_a_bug_settling_one_delivery_leaves_the_rest_of_its_batch_alone(
        amqp_url: str, management_url: str, name_prefix: str, tmp_path: Path,
        amqp: AbstractRobustConnection) -> None:
    """A delivery whose settling crashes goes round alone until the broker's delivery limit
    parks it; the valid deliveries of its batch are handled once, never sent round with it."""
    good = [an_order() for _ in range(6)]
    await preload_raw(amqp, name_prefix, [
        *map(as_message, good[:3]), raw(b"{not json", "bug"), *map(as_message, good[3:])],
        delivery_limit=2)
    settings = settings_for(ServiceSettings, amqp_url, name_prefix, tmp_path, prefetch=64,
                            batch_linger_ms=300, delivery_limit=2)
    runner = ParkingBugRunner(PROBE, settings, broker_wait=10)
    runtime = await runner.__aenter__()
    try:
        queue = runtime.topology.queue("probe", OrderPlaced)
        dead = await drain_dlq(amqp, queue, 1)
        deaths = dead["bug"].headers["x-death"]
        assert isinstance(deaths, list)
        assert [d.get("reason") for d in deaths if isinstance(d, dict)] == ["delivery_limit"]
        _, receipts = await audit_messages(amqp, runtime, until=len(good))
        assert Counter((r.handled_event_id, r.outcome) for r in receipts) == Counter(
            (str(o.event_id), "handled") for o in good)
        for event in good:
            assert await effect_count(runtime, event.order_id) == 1
    finally:
        await runner.stop()
        await delete_topology(amqp_url, [runner.topology], name_prefix, management_url)

