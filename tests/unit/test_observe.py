"""Expected vs actual without a broker: the comparison rules on made-up snapshots, the
management API's answers read from a fake transport, the growing-backlog rule."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from rich.console import Console

from common.ops import observe
from common.ops.doctor import Check, Diagnosis, print_checklist
from common.ops.observe import BrokerSnapshot, QueueStats
from common.ops.system_report import Announced, SystemReport, compare

pytestmark = pytest.mark.unit

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
P = "p."
INVENTORY = Announced("inventory", {"OrderPlaced": "p.inventory.order.placed"}, NOW)
LOGISTICS = Announced("logistics", {"OrderPlaced": "p.logistics.order.placed"}, NOW)
AUDIT = "p.audit.tracker"


def stats(name: str, ready: int = 0, consumers: int = 1, unacked: int | None = 0) -> QueueStats:
    return QueueStats(name=name, ready=ready, unacked=unacked, consumers=consumers,
                      publish_rate=1.5, deliver_rate=1.5)


def snapshot(*queues: QueueStats, bindings: Mapping[str, tuple[str, ...]] | None = None,
             reachable: bool = True, listed_all: bool = True,
             source: observe.Source = observe.MANAGEMENT) -> BrokerSnapshot:
    """A broker with these queues (each with an empty DLQ unless given) and bindings."""
    by_name = {q.name: q for q in queues}
    for q in queues:
        if not q.name.endswith(".dlq"):
            by_name.setdefault(f"{q.name}.dlq", stats(f"{q.name}.dlq", consumers=0))
    return BrokerSnapshot(source=source, reachable=reachable,
                          error=None if reachable else "refused", queues=by_name,
                          bindings=bindings, listed_all=listed_all, taken_at=NOW)


BOUND = {"p.order.placed": ("p.inventory.order.placed", "p.logistics.order.placed")}


def healthy_broker(bindings: Mapping[str, tuple[str, ...]] | None = BOUND,
                   **changes: Any) -> BrokerSnapshot:
    """Inventory, logistics and the tracker's queues, each consumed, bound as announced."""
    return snapshot(stats("p.inventory.order.placed"), stats("p.logistics.order.placed"),
                    stats(AUDIT), bindings=bindings, **changes)


def check(snap: BrokerSnapshot, registry: list[Announced] | None = None,
          **kwargs: Any) -> SystemReport:
    return compare(snap, [INVENTORY, LOGISTICS] if registry is None else registry, prefix=P,
                   now=NOW, announce_interval=60, kit_queues=[AUDIT], **kwargs)


def test_a_system_as_announced_is_healthy() -> None:
    """Every announced queue exists and is consumed, nothing else is bound: no problem."""
    report = check(healthy_broker())
    assert report.healthy
    assert report.problems == []
    assert [q.queue for q in report.queues] == [AUDIT, "p.inventory.order.placed",
                                                "p.logistics.order.placed"]
    assert report.queues[1].publish_rate == 1.5
    assert report.dead_letters == 0


def test_an_announced_queue_without_consumer_is_reported_by_name() -> None:
    """Logistics' queue has no consumer: one problem naming the subscriber and the queue."""
    broker = healthy_broker()
    queues = dict(broker.queues)
    queues["p.logistics.order.placed"] = stats("p.logistics.order.placed", ready=4, consumers=0)
    report = check(BrokerSnapshot(**{**broker.__dict__, "queues": queues}))
    assert not report.healthy
    assert report.problems == [
        "logistics: its queue p.logistics.order.placed has no consumer (4 message(s) waiting)"]
    logistics = next(s for s in report.subscribers if s.name == "logistics")
    assert logistics.queues[0].consumers == 0


def test_an_announced_queue_missing_from_the_broker_is_reported() -> None:
    """A subscriber announced a queue the broker does not have."""
    report = check(snapshot(stats("p.inventory.order.placed"), stats(AUDIT),
                            bindings={"p.order.placed": ("p.inventory.order.placed",)}))
    assert report.problems == [
        "logistics: its queue p.logistics.order.placed (OrderPlaced) does not exist on the "
        "broker"]
    assert [q.exists for q in report.subscribers[1].queues] == [False]


def test_a_queue_bound_to_an_event_exchange_but_never_announced_is_unannounced() -> None:
    """A hand-made queue on order.placed is listed and reported; so is its queue row."""
    broker = snapshot(stats("p.inventory.order.placed"), stats("p.logistics.order.placed"),
                      stats(AUDIT), stats("p.sneaky", consumers=0, ready=2),
                      bindings={"p.order.placed": ("p.inventory.order.placed",
                                                   "p.logistics.order.placed", "p.sneaky")})
    report = check(broker)
    assert [(u.queue, u.exchange) for u in report.unannounced_queues] == [
        ("p.sneaky", "p.order.placed")]
    assert any("p.sneaky is bound to p.order.placed" in p for p in report.problems)
    assert "p.sneaky" in [q.queue for q in report.queues]


def test_an_event_history_stream_is_not_an_unannounced_queue() -> None:
    """The stream its producer binds to order.placed keeps history; it is no subscriber."""
    bindings = {"p.order.placed": (*BOUND["p.order.placed"], "p.order.placed.history")}
    report = check(healthy_broker(bindings=bindings))
    assert report.unannounced_queues == []
    assert report.healthy


def test_without_bindings_unannounced_queues_cannot_be_told() -> None:
    """Under the AMQP fallback the bindings are unknown: no verdict, and it says so."""
    report = check(healthy_broker(bindings=None, source=observe.AMQP, listed_all=False))
    assert report.unannounced_queues == []
    assert not report.bindings_known
    assert report.healthy


def test_a_subscriber_silent_for_three_announce_intervals_is_stale() -> None:
    """last_seen older than 3 x SHOP_ANNOUNCE_INTERVAL: stale; just under it: not."""
    old = Announced("inventory", INVENTORY.consumes, NOW - timedelta(seconds=181))
    recent = Announced("logistics", LOGISTICS.consumes, NOW - timedelta(seconds=179))
    report = check(healthy_broker(), [old, recent])
    assert [(s.name, s.stale) for s in report.subscribers] == [("inventory", True),
                                                                ("logistics", False)]
    assert report.problems == ["inventory is stale: last announced 181 s ago, more than 3 x "
                               "SHOP_ANNOUNCE_INTERVAL (60 s)"]


def test_dead_letters_and_late_orders_are_counted_and_reported() -> None:
    """Messages in a DLQ and late orders each make a problem; the totals add up."""
    broker = healthy_broker()
    queues = {**broker.queues, "p.inventory.order.placed.dlq": stats(
        "p.inventory.order.placed.dlq", ready=3, consumers=0)}
    report = check(BrokerSnapshot(**{**broker.__dict__, "queues": queues}), late_orders=2)
    assert report.dead_letters == 3
    assert report.late_orders == 2
    assert report.problems == [
        "3 dead letter(s) waiting in p.inventory.order.placed.dlq (shop dlq list inventory)",
        "2 late order(s): an expected subscriber has not answered in time (shop order list)"]


def test_an_unreachable_broker_is_one_problem_not_one_per_queue() -> None:
    """When the broker cannot be read, the queues are not each reported missing."""
    report = check(snapshot(reachable=False, source=observe.AMQP, listed_all=False))
    assert report.problems == ["the broker cannot be reached: refused"]
    assert not report.broker.reachable


def test_an_unknown_registry_checks_the_kit_queues_only() -> None:
    """registry=None: the given queues are checked, nothing is called unannounced."""
    broker = healthy_broker()
    queues = dict(broker.queues)
    queues["p.logistics.order.placed"] = stats("p.logistics.order.placed", consumers=0)
    report = compare(BrokerSnapshot(**{**broker.__dict__, "queues": queues}), None, prefix=P,
                     now=NOW, announce_interval=60,
                     kit_queues=[AUDIT, "p.inventory.order.placed", "p.logistics.order.placed"])
    assert report.subscribers == []
    assert report.unannounced_queues == []
    assert report.problems == ["p.logistics.order.placed has no consumer (0 message(s) waiting)"]


def test_queues_with_a_dead_letter_queue_beside_them_are_discovered() -> None:
    """A later subscriber's queue is found by its DLQ; delay queues and other prefixes not."""
    names = ["p.loyalty.order.placed", "p.loyalty.order.placed.dlq",
             "p.loyalty.order.placed.retry.1s", "q.other.order.placed",
             "q.other.order.placed.dlq"]
    broker = BrokerSnapshot(source=observe.MANAGEMENT, reachable=True, error=None,
                            queues={n: stats(n) for n in names}, bindings={},
                            listed_all=True, taken_at=NOW)
    assert broker.discovered(P) == ["p.loyalty.order.placed"]


@pytest.mark.parametrize(("samples", "grows"), [
    ([1, 2, 3], True),
    ([0, 1, 2, 3], True),
    ([1, 1, 2], True),  # the management API had not refreshed between two samples
    ([1, 2], False),
    ([2, 2, 2], False),
    ([3, 2, 1], False),
    ([1, 3, 2], False),
    ([1, None, 3], False),
    ([5, 1, 2, 3], True),
    ([1, 2, 3, 3, 3], False),
])
def test_a_backlog_grows_when_ready_never_fell_and_rose_over_the_last_three_samples(
        samples: list[int | None], grows: bool) -> None:
    """Three samples, none lower than the one before, the last above the first; an unknown
    sample breaks it."""
    assert observe.growing(samples) is grows


async def test_the_management_api_answer_becomes_a_snapshot() -> None:
    """Queues under the prefix with counts and rates; bindings per exchange, queues only."""
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.url.raw_path.startswith(b"/api/queues/%2F?"):
            return httpx.Response(200, json=[
                {"name": "p.a.order.placed", "messages_ready": 2, "messages_unacknowledged": 1,
                 "consumers": 1, "message_stats": {"publish_details": {"rate": 3.5},
                                                   "deliver_get_details": {"rate": 2.0}}},
                {"name": "p.a.order.placed.dlq", "messages_ready": 0,
                 "messages_unacknowledged": 0, "consumers": 0},
                {"name": "other.queue", "messages_ready": 9, "messages_unacknowledged": 0,
                 "consumers": 0}])
        assert request.url.raw_path == b"/api/exchanges/%2F/p.order.placed/bindings/source", (
            request.url)
        return httpx.Response(200, json=[
            {"source": "p.order.placed", "destination": "p.a.order.placed",
             "destination_type": "queue"},
            {"source": "p.order.placed", "destination": "p.ex", "destination_type": "exchange"}])

    api = observe.ManagementApi(base="http://broker:15672", auth=("u", "p"), vhost="/")
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        snap = await observe.read_management(client, api, P, ["p.order.placed"])
    assert set(snap.queues) == {"p.a.order.placed", "p.a.order.placed.dlq"}
    row = snap.row("p.a.order.placed")
    assert (row.ready, row.unacked, row.consumers, row.dead_letters) == (2, 1, 1, 0)
    assert (row.publish_rate, row.deliver_rate) == (3.5, 2.0)
    assert snap.row("p.a.order.placed.dlq").publish_rate is None  # no traffic: no stats yet
    assert snap.bindings == {"p.order.placed": ("p.a.order.placed",)}
    [listing] = [r for r in requests if "columns" in r.url.params]
    assert "message_stats.publish_details.rate" in listing.url.params["columns"]
    assert len(requests) == 2  # one listing and one exchange's bindings


def test_the_event_exchanges_are_the_business_events_not_the_audit() -> None:
    """Unannounced queues are looked for on the business events' exchanges only."""
    exchanges = observe.event_exchanges(P)
    assert "p.order.placed" in exchanges
    assert "p.stock.reserved" in exchanges
    assert "p.audit" not in exchanges


def test_the_doctor_checklist_marks_each_check_and_lists_its_items() -> None:
    """✓ / ✗ / ? per check, the items under a failed one, one verdict line on top."""
    diagnosis = Diagnosis(checked_at=NOW, checks=[
        Check("broker reachable (AMQP)", "ok", "amqp://localhost"),
        Check("every expected queue has a consumer", "failed", "1 of 2 queue(s)",
              ("p.logistics.order.placed (logistics) has no consumer",)),
        Check("no unannounced queue", "unknown", "the bindings need the management API")])
    console = Console(record=True, width=200, file=io.StringIO())
    print_checklist(diagnosis, console)
    text = console.export_text()
    assert not diagnosis.healthy
    assert "1 check(s) failed" in text
    assert "✓ broker reachable (AMQP): amqp://localhost" in text
    assert "✗ every expected queue has a consumer: 1 of 2 queue(s)" in text
    assert "    p.logistics.order.placed (logistics) has no consumer" in text
    assert "? no unannounced queue" in text
    assert json.loads(json.dumps(diagnosis.as_dict()))["healthy"] is False
