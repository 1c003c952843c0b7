"""Faults of the broker itself: stopped, restarted, connections dropped, memory alarm.

Each test runs the four services and the probe subscriber (whose effects table has no
unique key, so a second effect would show) as processes against the suite's throwaway
RabbitMQ node, places orders over HTTP, inflicts the fault with rabbitmqctl, and checks the
ledger: every accepted order has exactly one effect in each subscriber.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from common.kit.topology import Topology
from order_service.service import service as order
from tests.faults.support import (
    DEFAULT_WATERMARK,
    SYSTEM,
    Node,
    Report,
    Shop,
    unsent_rows,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.faults

#: Low enough that any node is over it at once: the memory alarm goes off.
ALARM_WATERMARK = 0.0000001
#: The issue's bound for consumers to be back after a broker restart.
CONSUMERS_BACK_WITHIN = 15.0


def consumed_queues(shop: Shop) -> list[str]:
    """Every queue a service of the shop consumes: each subscriber's OrderPlaced queue, the
    order service's outcome queues and the tracker's audit queue."""
    topology = Topology(shop.prefix)
    order_queues = [topology.queue(order.name, cls) for cls in order.consumes]
    return sorted([shop.queue(s) for s in shop.subscribers] + order_queues
                  + [topology.audit_queue])


async def consumers_back(node: Node, queues: list[str]) -> dict[str, int] | None:
    """Consumers per queue when every queue has one again, else None."""
    try:
        counts = await node.declared(queues)
    except Exception:  # the broker is still starting: not back yet
        return None
    consumers = {name: count for name, (_ready, count) in counts.items()}
    return consumers if all(consumers.values()) else None


async def test_orders_placed_while_the_broker_is_stopped_are_delivered_when_it_returns(
        shop: Shop, node: Node, report: Report) -> None:
    """With the broker's app stopped, POST /orders still answers 202 and the orders wait in
    the outbox; after start_app every order reaches every subscriber exactly once."""
    await shop.up(*SYSTEM)
    await shop.place(20)
    await node.stop_app()
    down = await shop.place(150)
    assert len(down) == 150, f"refused while the broker was down: {shop.placement.refused}"
    assert unsent_rows(shop.db("order")) >= len(down), "the orders should wait in the outbox"
    await node.start_app()
    started = time.monotonic()
    await shop.delivered(timeout=120)
    recovery = time.monotonic() - started
    ledger = await shop.settled()
    await report(recovery_s=recovery, ledger=ledger, note="recovery: start_app to every effect")
    shop.assert_clean(accepted=170)


async def test_healthz_says_the_broker_is_down_while_it_is_stopped(
        shop: Shop, node: Node) -> None:
    """GET /healthz answers 503 with broker false while the broker's app is stopped, and
    200 again once it is back (README: "503 when either is down")."""
    await shop.up("order")
    assert await shop.health() == (200, True)
    await node.stop_app()
    await wait_for(lambda: _health_is(shop, (503, False)), timeout=15,
                   what="/healthz to report the broker down")
    await node.start_app()
    await wait_for(lambda: _health_is(shop, (200, True)), timeout=30,
                   what="/healthz to report the broker back")


async def _health_is(shop: Shop, expected: tuple[int, bool]) -> bool:
    return await shop.health() == expected


async def test_a_broker_restart_amid_a_thousand_orders_loses_nothing(
        shop: Shop, node: Node, report: Report) -> None:
    """stop_app + start_app while 1,000 orders are being placed: every queue has its
    consumers back within 15 s of the broker's return, and every order reaches every
    subscriber exactly once."""
    await shop.up(*SYSTEM)
    queues = consumed_queues(shop)
    assert await consumers_back(node, queues), "every queue should have a consumer at start"
    placing = asyncio.create_task(shop.place(1000, concurrency=16))
    await wait_until(lambda: shop.placement.sent >= 300, timeout=120,
                     what="300 orders to be sent before the restart")
    await node.restart()
    started = time.monotonic()
    consumers = await wait_for(lambda: consumers_back(node, queues),
                               timeout=CONSUMERS_BACK_WITHIN,
                               what="every queue to have its consumers back")
    back = time.monotonic() - started
    accepted = await placing
    assert len(accepted) == 1000, shop.placement.refused
    await shop.delivered(timeout=240)
    recovery = time.monotonic() - started
    await report(recovery_s=recovery,
                 note=f"consumers back on all {len(consumers)} queues {back:.1f}s after "
                      "start_app; recovery: start_app to every effect (placing went on)")
    shop.assert_clean(accepted=1000)
    for service in SYSTEM:
        # The outage in two lines, not the AMQP client's tracebacks and attempts.
        records = shop.log_records(service)
        events = [r.get("event") for r in records]
        assert "broker connection lost; reconnecting" in events, shop.log_tail(service)
        assert "broker connection restored" in events, shop.log_tail(service)
        client = [r for r in records if str(r.get("logger")).startswith(("aiormq", "aio_pika"))]
        assert client == [], client[:3]


async def test_connections_closed_by_the_broker_recover_and_lose_nothing(
        shop: Shop, node: Node, report: Report) -> None:
    """close_all_connections while orders are being placed: the services reconnect by
    themselves, consume again, and every order reaches every subscriber exactly once."""
    await shop.up(*SYSTEM)
    queues = consumed_queues(shop)
    placing = asyncio.create_task(shop.place(300))
    await wait_until(lambda: shop.placement.sent >= 100, timeout=60,
                     what="100 orders to be sent before the connections drop")
    await node.close_all_connections("fault suite: connections dropped")
    started = time.monotonic()
    consumers = await wait_for(lambda: consumers_back(node, queues),
                               timeout=CONSUMERS_BACK_WITHIN,
                               what="every queue to have its consumers back")
    back = time.monotonic() - started
    accepted = await placing
    assert len(accepted) == 300, shop.placement.refused
    await shop.delivered(timeout=120)
    recovery = time.monotonic() - started
    ledger = await shop.settled()
    await report(recovery_s=recovery, ledger=ledger,
                 note=f"consumers back on all {len(consumers)} queues after {back:.1f}s; "
                      "recovery: the drop to every effect (placing went on)")
    shop.assert_clean(accepted=300)


async def test_a_memory_alarm_holds_orders_back_and_loses_none_when_it_clears(
        shop: Shop, node: Node, report: Report) -> None:
    """With the memory alarm raised (publishing blocked) the API still accepts orders and
    none reaches a subscriber; once it clears, every order reaches every subscriber once."""
    await shop.up(*SYSTEM)
    await shop.place(20)
    await shop.delivered(timeout=60)
    await node.set_vm_memory_high_watermark(ALARM_WATERMARK)
    await wait_for(node.memory_alarm, timeout=30, what="the memory alarm to go off")
    during = await shop.place(100)
    assert len(during) == 100, f"refused during the alarm: {shop.placement.refused}"
    blocked = shop.ledger()
    assert blocked.lost == len(during), (
        f"publishing is blocked, so none of the {len(during)} orders should have reached a "
        f"subscriber yet: {blocked.brief()}")
    started = time.monotonic()
    await node.set_vm_memory_high_watermark(DEFAULT_WATERMARK)
    await wait_for(lambda: _cleared(node), timeout=30, what="the memory alarm to clear")
    await shop.delivered(timeout=120)
    recovery = time.monotonic() - started
    ledger = await shop.settled()
    await report(recovery_s=recovery, ledger=ledger,
                 note="recovery: alarm cleared to every effect")
    shop.assert_clean(accepted=120)


async def _cleared(node: Node) -> bool:
    return not await node.memory_alarm()
