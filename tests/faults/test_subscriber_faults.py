"""Faults of the subscribers and of what they receive: killed mid-delivery, a duplicate
publish, failing handlers, poison messages, a subscriber down while orders pile up.

The killing and failing is done by the test-only probe subscriber (probe_service.py) running
on the real kit beside the three real subscribers. The probe runs in the other tests too:
its effects table has no unique key, so if deduplication failed a second effect would show
(the real services' own unique keys would turn it into a rolled-back duplicate instead).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid

import aio_pika
import pytest

from common.events import OrderPlaced
from common.kit.broker import message_for
from tests.faults.probe_service import FAIL_ALWAYS, KILL_AFTER_COMMIT, KILL_BEFORE_COMMIT
from tests.faults.support import SYSTEM, Node, Report, Shop, wait_for, wait_until

pytestmark = pytest.mark.faults

#: The probe's retry delays in the retry test (seconds).
RETRY_DELAYS = (0.3, 1.5)


async def test_a_subscriber_killed_before_or_after_its_commit_has_exactly_one_effect(
        shop: Shop, report: Report) -> None:
    """SIGKILL inside the handler (the effect not committed), and again after the commit
    but before the ack, each with other deliveries in flight: restarted, the probe has
    exactly one effect per order; the second kill's redelivery is recognised as a
    duplicate."""
    await shop.up(*SYSTEM)
    victims: dict[str, uuid.UUID] = {}
    for moment in (KILL_BEFORE_COMMIT, KILL_AFTER_COMMIT):
        company = asyncio.create_task(shop.place(30))  # other deliveries in flight
        [victims[moment]] = await shop.place(1, customer=moment)
        await wait_until(lambda: not shop.running("probe"), timeout=30,
                         what=f"the probe to kill itself ({moment})")
        assert shop.procs["probe"].returncode == -signal.SIGKILL
        assert len(await company) == 30
        restarted = time.monotonic()
        shop.start("probe")
        await shop.ready("probe")
    await shop.delivered(timeout=60)
    recovery = time.monotonic() - restarted
    shop.assert_clean(accepted=62)
    ledger = await shop.settled()
    await report(recovery_s=recovery, ledger=ledger,
                 note="recovery: the second restart to every effect")
    shop.assert_clean(accepted=62)

    before = victims[KILL_BEFORE_COMMIT]
    assert len(shop.probe_calls(before)) == 2, "killed on the first call, handled on the next"
    after = victims[KILL_AFTER_COMMIT]
    assert len(shop.probe_calls(after)) == 1, "committed once; the redelivery is deduplicated"
    _body, after_event = shop.order_event(after)
    assert ("probe", "duplicate") in shop.receipts(after_event)


async def test_the_same_event_published_twice_has_one_effect(
        shop: Shop, node: Node, report: Report) -> None:
    """Every OrderPlaced published a second time, exactly as the relay sent it: each
    subscriber acks the copy as a duplicate, with no second effect."""
    await shop.up(*SYSTEM)
    accepted = await shop.place(20)
    await shop.delivered(timeout=60)
    copies = []
    for order_id in accepted:
        body, _event_id = shop.order_event(order_id)
        copies.append(message_for(OrderPlaced.model_validate_json(body), body=body.encode()))
    await shop.publish_raw("order.placed", copies)
    expected = len(copies) * len(shop.subscribers)
    await wait_until(lambda: shop.ledger().outcomes.get("duplicate", 0) >= expected,
                     timeout=60, what=f"{expected} duplicate receipts")
    ledger = await shop.settled()
    await report(ledger=ledger, sent=len(accepted) + len(copies),
                 note=f"{len(copies)} events published twice")
    shop.assert_clean(accepted=20)
    assert ledger.outcomes.get("duplicate") == expected


async def test_a_failing_handler_is_retried_with_growing_delays_or_dead_lettered_and_replayed(
        shop: Shop, node: Node, report: Report) -> None:
    """A handler failing twice is handled once on the third attempt, after waits that grow
    (0.3 s, then 1.5 s). One that always fails is in the probe's dead-letter queue after
    its last attempt, with the reason; once the fault is fixed, `shop dlq replay probe
    --id` gets it handled exactly once."""
    # Delays further apart than the suite's 0.2 s and 0.5 s, so a loaded machine cannot
    # blur which wait was longer.
    shop.service_env["probe"] = {"SHOP_RETRY_DELAYS": ",".join(map(str, RETRY_DELAYS))}
    shop.probe_broken_flag.touch()
    await shop.up(*SYSTEM)
    [flaky] = await shop.place(1, customer="fail-2")
    [broken] = await shop.place(1, customer=FAIL_ALWAYS)
    _body, broken_event = shop.order_event(broken)

    dlq = f"{shop.queue('probe')}.dlq"
    await wait_for(lambda: _ready(node, dlq, 1), timeout=30,
                   what="the always-failing order in the probe's dead-letter queue")
    calls = shop.probe_calls(flaky)
    assert len(calls) == 3, calls
    first_wait, second_wait = calls[1] - calls[0], calls[2] - calls[1]
    assert first_wait >= RETRY_DELAYS[0], calls
    assert second_wait >= RETRY_DELAYS[1], calls
    assert second_wait > first_wait, calls
    assert len(shop.probe_calls(broken)) == 3, "one attempt and two retries, no more"

    listing = await shop.shop_cli("dlq", "list", "probe", "--json")
    assert listing.returncode == 0, listing.stderr
    [letter] = json.loads(listing.stdout)["dead_letters"]
    assert letter["event_id"] == broken_event
    assert letter["reason"] == "retries_exhausted"
    assert letter["exception_type"] == "ProbeFailureError"
    assert letter["attempts"] == 3

    shop.probe_broken_flag.unlink()  # the fault is fixed
    started = time.monotonic()
    replayed = await shop.shop_cli("dlq", "replay", "probe", "--id", broken_event)
    assert replayed.returncode == 0, replayed.stderr + replayed.stdout
    await shop.delivered(timeout=60)
    recovery = time.monotonic() - started
    ledger = await shop.settled()
    await wait_until(lambda: ("probe", "replayed") in shop.receipts(broken_event), timeout=30,
                     what="the replay's receipt")
    await report(recovery_s=recovery, ledger=ledger,
                 note=f"retry waits {first_wait:.2f}s, {second_wait:.2f}s; "
                      "recovery: `shop dlq replay` to its effect")
    shop.assert_clean(accepted=2)
    assert len(shop.probe_calls(broken)) == 4
    assert {("probe", o) for o in ("retried", "dead_lettered", "handled")} \
        <= shop.receipts(broken_event)
    assert await _ready(node, dlq, 0)


async def test_poison_messages_are_dead_lettered_at_once_and_the_rest_keep_flowing(
        shop: Shop, node: Node, report: Report) -> None:
    """Malformed JSON, a wrong schema and an unknown event type, published ahead of 50
    orders: each subscriber parks the three in its dead-letter queue on the first attempt
    (reason poison), and every order behind them is handled exactly once."""
    await shop.up(*SYSTEM)
    poison = {
        "malformed JSON": (b'{"event_type": "OrderPlaced", "order_id": ', "OrderPlaced"),
        "wrong schema": (json.dumps({"event_type": "OrderPlaced", "event_id": str(uuid.uuid4()),
                                     "order_id": "not-a-uuid", "lines": []}).encode(),
                         "OrderPlaced"),
        "unknown type": (json.dumps({"event_type": "OrderTeleported",
                                     "event_id": str(uuid.uuid4())}).encode(),
                         "OrderTeleported"),
    }
    ids = {what: str(uuid.uuid4()) for what in poison}
    await shop.publish_raw("order.placed", [
        aio_pika.Message(body=body, message_id=ids[what], type=event_type,
                         content_type="application/json",
                         delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        for what, (body, event_type) in poison.items()])
    await shop.place(50)
    started = time.monotonic()
    await shop.delivered(timeout=60)
    recovery = time.monotonic() - started
    ledger = await shop.settled()
    await report(recovery_s=recovery, ledger=ledger, sent=len(poison) + 50,
                 note="3 poison messages ahead of the orders")
    shop.assert_clean(accepted=50)

    for subscriber in shop.subscribers:
        dlq = f"{shop.queue(subscriber)}.dlq"
        letters = await shop.dead_letters(dlq, 10)
        parked = {m["properties"]["message_id"]: m["properties"]["headers"] for m in letters}
        assert set(parked) == set(ids.values()), f"{dlq}: {parked}"
        for headers in parked.values():
            assert headers["x-error-reason"] == "poison"
            assert headers["x-attempts"] == 1
            assert headers["x-service"] == subscriber
        for message_id in ids.values():
            assert shop.receipts(message_id) == {(subscriber, "dead_lettered")
                                                 for subscriber in shop.subscribers}
    assert "retried" not in ledger.outcomes


async def test_a_subscriber_down_while_five_thousand_orders_arrive_drains_them_all(
        shop: Shop, node: Node, report: Report) -> None:
    """Logistics stopped while 5,000 orders are placed: its queue holds all 5,000 with no
    consumer; started again, it drains them, each order handled exactly once.

    Only the order service and logistics run: the fault is about one subscriber's queue,
    and the other subscribers' receipts would triple the order service's work per order.
    """
    await shop.up("order", "logistics")
    shop.stop("logistics")
    accepted = await shop.place(5000, concurrency=32, timeout=300)
    assert len(accepted) == 5000, shop.placement.refused
    queue = shop.queue("logistics")
    held = await wait_for(lambda: _ready(node, queue, 5000), timeout=60,
                          what="the 5,000 orders in logistics' queue")
    shop.start("logistics")
    started = time.monotonic()
    await shop.delivered(timeout=300)
    drained = time.monotonic() - started
    await report(recovery_s=drained,
                 note=f"queue held {held[0]} with {held[1]} consumers; "
                      "recovery: logistics restart to its queue drained")
    assert held == (5000, 0)
    shop.assert_clean(accepted=5000)


async def _ready(node: Node, queue: str, count: int) -> tuple[int, int] | None:
    """(ready, consumers) of `queue` once it holds exactly `count` ready messages."""
    [(ready, consumers)] = (await node.declared([queue])).values()
    return (ready, consumers) if ready == count else None
