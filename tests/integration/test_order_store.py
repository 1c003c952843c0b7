"""Order handlers on the real order store, SQLite and PostgreSQL: registry, receipts, state."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from common.events import (
    DeliveryReceipt,
    DeliveryReceipts,
    Event,
    OrderPlaced,
    ReservedLine,
    SellerNotified,
    ShipmentScheduled,
    StockReservationFailed,
    StockReserved,
    SubscriberAnnounced,
    UnreservableLine,
)
from common.kit.db import UTCDateTime, create_tables, make_engine
from common.kit.outbox import kit_metadata, outbox
from common.kit.service import RejectedError
from order_service.domain.order import NewOrder, OrderState, place_order
from order_service.domain.views import OrderStatus
from order_service.service import PRODUCERS, service
from order_service.store import OrderStore
from order_service.store.tables import deliveries, metadata, orders, outcomes, upgrade_schema
from tests.factories import make_address, make_line, make_order
from tests.storage import index_names

pytestmark = pytest.mark.integration

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
PLACED_AT = T0 + timedelta(minutes=10)
#: The one line of every order placed here.
LINE = make_line("SKU-1", 2, price="3.50", seller="s1")
#: The order service as the kit runs it: its handlers, called with a delivery's store.
ORDER = service.spec()


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(db_url)
    await create_tables(engine, metadata)
    yield engine
    await engine.dispose()


async def deliver(engine: AsyncEngine, event: Event) -> None:
    """What the kit does: the handler for the event's type, in one transaction, the event
    stamped by the service that produces it."""
    handler = {**ORDER.handlers, **ORDER.audit_handlers}[type(event)]
    if event.producer is None and type(event) in PRODUCERS:
        event = event.model_copy(update={"producer": PRODUCERS[type(event)]})
    async with engine.begin() as conn:
        assert list(await handler(event, ORDER.store(conn))) == []


async def place(engine: AsyncEngine, at: datetime = PLACED_AT) -> OrderPlaced:
    event = place_order(NewOrder(customer_id="cust-1", lines=[LINE],
                                 shipping_address=make_address()), now=at)
    async with engine.begin() as conn:
        await OrderStore(conn).add_order(event)
    return event


async def status(engine: AsyncEngine, order_id: uuid.UUID) -> OrderStatus:
    async with engine.connect() as conn:
        found = await OrderStore(conn).status(order_id)
    assert found is not None
    return found


def announced(name: str, at: datetime = T0, *, order_placed: bool = True,
              instance: str = "host:1") -> SubscriberAnnounced:
    consumes = {"OrderPlaced": f"{name}.order.placed"} if order_placed else {
        "StockReserved": f"{name}.stock.reserved"}
    return SubscriberAnnounced(subscriber=name, instance=instance, consumes=consumes,
                               occurred_at=at, producer=name)


def receipt_for(event: Event, subscriber: str, outcome: str = "handled",
                error: str | None = None, **extra: Any) -> DeliveryReceipt:
    return DeliveryReceipt(
        subscriber=subscriber, queue=f"{subscriber}.x",
        handled_event_id=str(event.event_id), handled_event_type=event.event_type,
        outcome=outcome,  # type: ignore[arg-type]
        error=error, received_at=PLACED_AT + timedelta(seconds=1), duration_ms=2.5,
        correlation_id=event.correlation_id, causation_id=event.event_id, producer=subscriber,
        **extra)


def by_name(st: OrderStatus) -> dict[str, str]:
    return {s.name: s.status for s in st.subscribers}


async def test_the_order_service_handles_the_outcome_and_audit_events() -> None:
    """The order service consumes the four outcome events and tracks the three audit
    events."""
    assert set(service.consumes) == {StockReserved, StockReservationFailed,
                                     ShipmentScheduled, SellerNotified}
    assert set(service.tracked) == {SubscriberAnnounced, DeliveryReceipt, DeliveryReceipts}


async def test_announcement_registers_and_refreshes_without_moving_first_seen(
        engine: AsyncEngine) -> None:
    """A re-announcement updates instance, queues and last_seen; first_seen stays."""
    await deliver(engine, announced("inventory", T0, instance="host:1"))
    await deliver(engine, announced("inventory", T0 + timedelta(hours=1), instance="host:2"))
    async with engine.connect() as conn:
        [entry] = await OrderStore(conn).list_subscribers()
    assert entry.first_seen == T0
    assert entry.last_seen == T0 + timedelta(hours=1)
    assert entry.instance == "host:2"
    assert entry.consumes == {"OrderPlaced": "inventory.order.placed"}


async def test_a_redelivered_announcement_changes_nothing(engine: AsyncEngine) -> None:
    """The audit queue is not deduped by the kit: the same announcement twice is one entry."""
    event = announced("inventory")
    await deliver(engine, event)
    await deliver(engine, event)
    async with engine.connect() as conn:
        assert len(await OrderStore(conn).list_subscribers()) == 1


async def test_expected_subscribers_are_the_order_placed_consumers_known_at_placement(
        engine: AsyncEngine) -> None:
    """Only registered OrderPlaced consumers are expected; others and later ones are not."""
    await deliver(engine, announced("inventory"))
    await deliver(engine, announced("logistics"))
    await deliver(engine, announced("order", order_placed=False))
    order = await place(engine)
    await deliver(engine, announced("audit", PLACED_AT + timedelta(minutes=1)))
    st = await status(engine, order.order_id)
    assert by_name(st) == {"inventory": "pending", "logistics": "pending"}
    assert st.state == OrderState.ACCEPTED
    assert not st.complete


async def test_receipts_give_each_subscriber_its_outcome(engine: AsyncEngine) -> None:
    """Handled and dead-lettered receipts show per subscriber, with the error and timing."""
    for name in ("inventory", "logistics", "seller"):
        await deliver(engine, announced(name))
    order = await place(engine)
    await deliver(engine, receipt_for(order, "inventory"))
    await deliver(engine, receipt_for(order, "logistics", "dead_lettered", "KeyError: 'ZZ'"))
    st = await status(engine, order.order_id)
    assert by_name(st) == {"inventory": "handled", "logistics": "failed", "seller": "pending"}
    failed = next(s for s in st.subscribers if s.name == "logistics")
    assert failed.error == "KeyError: 'ZZ'"
    assert failed.duration_ms == 2.5
    assert failed.at == PLACED_AT + timedelta(seconds=1)
    await deliver(engine, receipt_for(order, "seller"))
    assert (await status(engine, order.order_id)).complete


async def test_the_first_receipt_shows_the_order_was_published(engine: AsyncEngine) -> None:
    """accepted -> placed once a receipt for the order's OrderPlaced arrives."""
    await deliver(engine, announced("inventory"))
    order = await place(engine)
    await deliver(engine, receipt_for(order, "inventory"))
    assert (await status(engine, order.order_id)).state == OrderState.PLACED


async def test_receipts_of_other_events_in_the_flow_do_not_count_for_the_fan_out(
        engine: AsyncEngine) -> None:
    """The order service's own receipt for StockReserved is not an answer to OrderPlaced."""
    await deliver(engine, announced("inventory"))
    order = await place(engine)
    reserved = StockReserved(order_id=order.order_id, lines=(ReservedLine(sku="SKU-1",
                                                                          quantity=2),),
                             ).caused(order, "inventory")
    await deliver(engine, receipt_for(reserved, "order"))
    st = await status(engine, order.order_id)
    assert by_name(st) == {"inventory": "pending"}
    assert st.state == OrderState.ACCEPTED


async def test_a_redelivered_receipt_is_kept_once(engine: AsyncEngine) -> None:
    """The same receipt delivered twice is one row; a new receipt of the same kind too."""
    await deliver(engine, announced("inventory"))
    order = await place(engine)
    first = receipt_for(order, "inventory", "dead_lettered", "boom")
    await deliver(engine, first)
    await deliver(engine, first)
    await deliver(engine, receipt_for(order, "inventory", "dead_lettered", "boom again"))
    [sub] = (await status(engine, order.order_id)).subscribers
    assert sub.status == "failed"
    assert sub.error == "boom again"


async def test_a_receipt_outside_any_order_is_kept_without_harm(engine: AsyncEngine) -> None:
    """Receipts of other flows, or of unreadable messages, are stored and break nothing."""
    stranger = DeliveryReceipt(subscriber="inventory", queue="inventory.order.placed",
                               handled_event_id=None, handled_event_type=None,
                               outcome="dead_lettered", error="PoisonMessage: not JSON",
                               received_at=T0, duration_ms=0.1, correlation_id="not-an-order")
    await deliver(engine, stranger)
    await deliver(engine, stranger)
    other_flow = receipt_for(SubscriberAnnounced(subscriber="x", instance="i", consumes={},
                                                 correlation_id=str(uuid.uuid4())), "seller")
    await deliver(engine, other_flow)
    async with engine.connect() as conn:
        assert await OrderStore(conn).list_orders() == []


async def test_a_receipt_of_a_foreign_message_with_long_ids_is_kept(engine: AsyncEngine) -> None:
    """An unreadable message carries whatever id and type its publisher set, up to AMQP's
    255 characters, and a host name may be as long: kept on every database (PostgreSQL
    enforces column lengths, SQLite does not)."""
    long_id, long_type = "m" * 255, "T" * 255
    await deliver(engine, DeliveryReceipt(
        subscriber="inventory", queue="inventory.order.placed", handled_event_id=long_id,
        handled_event_type=long_type, outcome="dead_lettered", error="PoisonMessage: not JSON",
        received_at=T0, duration_ms=0.1))
    await deliver(engine, announced("inventory", instance=f"{'h' * 253}:4194304"))
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(deliveries.c.event_id, deliveries.c.event_type)
                                   )).all()
        [registered] = await OrderStore(conn).list_subscribers()
    assert [tuple(r) for r in rows] == [(long_id, long_type)]
    assert registered.instance.endswith(":4194304")


async def test_a_subscriber_added_later_shows_up_when_it_answers(engine: AsyncEngine) -> None:
    """An unexpected subscriber's receipt appears in the status, marked as joined later."""
    await deliver(engine, announced("inventory"))
    order = await place(engine)
    await deliver(engine, announced("audit", PLACED_AT + timedelta(minutes=1)))
    await deliver(engine, receipt_for(order, "inventory"))
    await deliver(engine, receipt_for(order, "audit"))
    st = await status(engine, order.order_id)
    assert by_name(st) == {"audit": "handled", "inventory": "handled"}
    assert [s.expected for s in st.subscribers] == [False, True]
    assert st.complete


async def test_stock_reserved_confirms_the_order(engine: AsyncEngine) -> None:
    """StockReserved records the reserved lines and confirms the order."""
    order = await place(engine)
    event = StockReserved(order_id=order.order_id,
                          lines=(ReservedLine(sku="SKU-1", quantity=2),)).caused(order, "inventory")
    await deliver(engine, event)
    st = await status(engine, order.order_id)
    assert st.state == OrderState.CONFIRMED
    [outcome] = st.outcomes
    assert outcome.kind == "stock_reserved"
    assert outcome.detail == {"lines": [{"sku": "SKU-1", "quantity": 2}]}


async def test_stock_failure_rejects_the_order_with_its_reason(engine: AsyncEngine) -> None:
    """StockReservationFailed records the reason and the lines, and rejects the order."""
    order = await place(engine)
    event = StockReservationFailed(
        order_id=order.order_id, reason="not enough stock for SKU-1",
        lines=(UnreservableLine(sku="SKU-1", requested=2, available=1,
                                reason="insufficient_stock"),)).caused(order, "inventory")
    await deliver(engine, event)
    st = await status(engine, order.order_id)
    assert st.state == OrderState.REJECTED
    assert st.outcomes[0].kind == "stock_failed"
    assert st.outcomes[0].detail["reason"] == "not enough stock for SKU-1"
    assert st.outcomes[0].detail["lines"][0]["available"] == 1


async def test_a_late_receipt_does_not_undo_confirmation(engine: AsyncEngine) -> None:
    """StockReserved arriving before the receipt: the order stays confirmed."""
    await deliver(engine, announced("inventory"))
    order = await place(engine)
    await deliver(engine, StockReserved(order_id=order.order_id, lines=(
        ReservedLine(sku="SKU-1", quantity=2),)).caused(order, "inventory"))
    await deliver(engine, receipt_for(order, "inventory"))
    assert (await status(engine, order.order_id)).state == OrderState.CONFIRMED


async def test_shipment_and_seller_outcomes_are_recorded(engine: AsyncEngine) -> None:
    """ShipmentScheduled and SellerNotified are kept as outcomes; the order is placed."""
    order = await place(engine)
    shipment_id = uuid.uuid4()
    await deliver(engine, ShipmentScheduled(
        order_id=order.order_id, shipment_id=shipment_id, carrier="DHL",
        tracking_number="DHL-1", estimated_delivery=date(2025, 1, 3),
        occurred_at=PLACED_AT + timedelta(seconds=2)).caused(order, "logistics"))
    await deliver(engine, SellerNotified(
        order_id=order.order_id, seller_id="s1",
        lines=(LINE,),
        occurred_at=PLACED_AT + timedelta(seconds=3)).caused(order, "seller"))
    st = await status(engine, order.order_id)
    assert st.state == OrderState.PLACED
    assert [o.kind for o in st.outcomes] == ["shipment", "seller"]
    assert st.outcomes[0].detail == {"shipment_id": str(shipment_id), "carrier": "DHL",
                                     "tracking_number": "DHL-1",
                                     "estimated_delivery": "2025-01-03"}
    assert st.outcomes[1].detail["seller_id"] == "s1"


async def test_an_outcome_for_an_unknown_order_is_refused(engine: AsyncEngine) -> None:
    """An outcome about an order this service never placed is refused (the kit parks it as a
    dead letter with the reason) and leaves nothing behind."""
    stray = StockReserved(order_id=uuid.uuid4(), lines=(ReservedLine(sku="S", quantity=1),))
    with pytest.raises(RejectedError) as refused:
        await deliver(engine, stray)
    assert refused.value.reason == "unknown_order"
    async with engine.connect() as conn:
        assert await OrderStore(conn).status(stray.order_id) is None
        assert (await conn.execute(sa.select(sa.func.count()).select_from(outcomes))
                ).scalar_one() == 0


async def test_an_outcome_from_another_service_is_refused(engine: AsyncEngine) -> None:
    """StockReserved is inventory's to report: from anyone else it is refused and the order
    stays as it was."""
    order = await place(engine)
    forged = StockReserved(order_id=order.order_id, lines=(ReservedLine(sku="SKU-1", quantity=2),)
                           ).caused(order, "seller")
    with pytest.raises(RejectedError) as refused:
        await deliver(engine, forged)
    assert refused.value.reason == "untrusted_producer"
    assert (await status(engine, order.order_id)).state == OrderState.ACCEPTED


async def test_status_keeps_the_order_as_placed(engine: AsyncEngine) -> None:
    """The status carries the order's lines, address, total and placement time."""
    order = await place(engine)
    st = await status(engine, order.order_id)
    assert st.order.order_id == order.order_id
    assert st.order.total == Decimal("7.00")
    assert st.order.lines == order.lines
    assert st.order.placed_at == PLACED_AT


async def test_list_orders_newest_first_with_fan_out_counts(engine: AsyncEngine) -> None:
    """The list shows the latest orders first, each with handled/failed/pending counts."""
    await deliver(engine, announced("inventory"))
    await deliver(engine, announced("logistics"))
    older = await place(engine, PLACED_AT)
    newer = await place(engine, PLACED_AT + timedelta(minutes=1))
    await deliver(engine, receipt_for(older, "inventory"))
    await deliver(engine, receipt_for(older, "logistics", "dead_lettered", "x"))
    async with engine.connect() as conn:
        summaries = await OrderStore(conn).list_orders(limit=10)
        assert [s.order_id for s in await OrderStore(conn).list_orders(limit=1)] == [
            newer.order_id]
    assert [s.order_id for s in summaries] == [newer.order_id, older.order_id]
    assert (summaries[0].handled, summaries[0].failed, summaries[0].pending) == (0, 0, 2)
    assert (summaries[1].handled, summaries[1].failed, summaries[1].pending) == (1, 1, 0)
    assert summaries[1].total == Decimal("7.00")


async def test_unknown_order_has_no_status(engine: AsyncEngine) -> None:
    """Asking for an order that does not exist gives None, not an error."""
    async with engine.connect() as conn:
        assert await OrderStore(conn).status(uuid.uuid4()) is None


async def test_a_subscriber_started_before_the_order_is_expected_even_if_read_later(
        engine: AsyncEngine) -> None:
    """An announcement the tracker reads after the order still counts by its own time."""
    order = await place(engine)
    await deliver(engine, announced("inventory", at=PLACED_AT - timedelta(seconds=1)))
    await deliver(engine, announced("latecomer", at=PLACED_AT + timedelta(seconds=1)))
    found = await status(engine, order.order_id)
    assert {s.name: s.status for s in found.subscribers} == {"inventory": "pending"}
    assert not found.complete


async def test_money_reads_back_to_the_cent_at_the_largest_amount(engine: AsyncEngine) -> None:
    """The order's total (NUMERIC(14, 2)) comes back exact, as a Decimal, at the 14 digits
    the event allows: no float rounding on either database."""
    big = make_line("SKU-GOLD", 99, price="9999999999.99", seller="s1")
    event = place_order(NewOrder(customer_id="cust-1", lines=[big],
                                 shipping_address=make_address()), now=PLACED_AT)
    async with engine.begin() as conn:
        await OrderStore(conn).add_order(event)
    async with engine.connect() as conn:
        [summary] = await OrderStore(conn).list_orders()
    assert isinstance(summary.total, Decimal)
    assert summary.total == Decimal("989999999999.01") == event.total


# --- late orders, the trace, an older database ------------------------------------------

DEADLINE = timedelta(seconds=30)


async def test_late_orders_are_those_an_expected_subscriber_left_unanswered(
        engine: AsyncEngine) -> None:
    """Past the deadline the order nobody answered is late; a handled one, a failed one and
    one still within its deadline are not. The expectation frozen at placement counts even
    after the subscriber stopped consuming OrderPlaced."""
    await deliver(engine, announced("inventory"))
    handled = await place(engine, PLACED_AT)
    failed = await place(engine, PLACED_AT + timedelta(seconds=1))
    silent = await place(engine, PLACED_AT + timedelta(seconds=2))
    recent = await place(engine, PLACED_AT + timedelta(seconds=60))
    await deliver(engine, receipt_for(handled, "inventory"))
    await deliver(engine, receipt_for(failed, "inventory", "dead_lettered", error="boom"))
    await deliver(engine, announced("inventory", T0 + timedelta(minutes=1), order_placed=False))
    now = PLACED_AT + timedelta(seconds=70)
    async with engine.connect() as conn:
        store = OrderStore(conn)
        late = await store.late_orders(now, DEADLINE)
        listed = {o.order_id: o for o in await store.list_orders(now=now, late_after=DEADLINE)}
        silent_status = await store.status(silent.order_id, now=now, late_after=DEADLINE)
    assert [o.order_id for o in late] == [silent.order_id]
    assert [(s.name, s.status) for s in late[0].subscribers] == [("inventory", "late")]
    assert (listed[recent.order_id].pending, listed[recent.order_id].late) == (1, 0)
    assert (listed[failed.order_id].failed, listed[failed.order_id].late) == (1, 0)
    assert silent_status is not None
    assert [(s.status, s.late) for s in silent_status.subscribers] == [("late", True)]


async def test_a_replayed_dead_letter_is_late_again_only_after_a_new_deadline(
        engine: AsyncEngine) -> None:
    """Dead-lettered then replayed: pending for the deadline after the replay, then late."""
    await deliver(engine, announced("inventory"))
    order = await place(engine)
    await deliver(engine, receipt_for(order, "inventory", "dead_lettered", error="boom"))
    replayed = receipt_for(order, "inventory", "replayed").model_copy(
        update={"received_at": PLACED_AT + timedelta(minutes=5)})
    await deliver(engine, replayed)
    async with engine.connect() as conn:
        store = OrderStore(conn)
        soon = await store.late_orders(PLACED_AT + timedelta(minutes=5, seconds=10), DEADLINE)
        later = await store.late_orders(PLACED_AT + timedelta(minutes=6), DEADLINE)
    assert soon == []
    assert [o.order_id for o in later] == [order.order_id]


async def settle(engine: AsyncEngine, now: datetime, *, chunk: int = 2000) -> int:
    """What the API does before a late scan: settle chunk after chunk; returns the chunks."""
    after: datetime | None = None
    chunks = 0
    while True:
        async with engine.begin() as conn:
            after = await OrderStore(conn).settle_answered(now, now - DEADLINE, after=after,
                                                           chunk=chunk)
        chunks += 1
        if after is None:
            return chunks


async def unsettled(engine: AsyncEngine) -> set[uuid.UUID]:
    async with engine.connect() as conn:
        return {uuid.UUID(i) for i in (await conn.execute(
            sa.select(orders.c.order_id).where(orders.c.settled_at.is_(None)))).scalars()}


async def test_settling_leaves_the_late_scan_only_the_orders_still_open(
        engine: AsyncEngine) -> None:
    """Orders every expected subscriber answered for good (handled, dead-lettered) by the
    deadline are settled, a few per chunk; unanswered, retrying and recent ones stay open,
    and the late orders found are the same as without settling."""
    await deliver(engine, announced("inventory"))
    answered = [await place(engine, PLACED_AT + timedelta(seconds=i)) for i in range(5)]
    for order in answered[:4]:
        await deliver(engine, receipt_for(order, "inventory"))
    await deliver(engine, receipt_for(answered[4], "inventory", "dead_lettered", error="x"))
    silent = await place(engine, PLACED_AT + timedelta(seconds=6))
    retrying = await place(engine, PLACED_AT + timedelta(seconds=7))
    await deliver(engine, receipt_for(retrying, "inventory", "retried", error="x"))
    recent = await place(engine, PLACED_AT + timedelta(seconds=60))
    await deliver(engine, receipt_for(recent, "inventory"))
    now = PLACED_AT + timedelta(seconds=70)
    async with engine.connect() as conn:
        before = await OrderStore(conn).late_orders(now, DEADLINE)

    assert await settle(engine, now, chunk=2) == 4  # 7 orders by the cutoff, 2 per chunk

    assert await unsettled(engine) == {silent.order_id, retrying.order_id, recent.order_id}
    async with engine.connect() as conn:
        after = await OrderStore(conn).late_orders(now, DEADLINE)
    assert [o.order_id for o in after] == [o.order_id for o in before] == [
        retrying.order_id, silent.order_id]
    assert await settle(engine, now) == 1
    assert await unsettled(engine) == {silent.order_id, retrying.order_id, recent.order_id}


async def test_a_replayed_dead_letter_reopens_a_settled_order(engine: AsyncEngine) -> None:
    """Dead-lettered, settled, then replayed: the late scan sees the order again, late once
    the deadline after the replay has passed."""
    await deliver(engine, announced("inventory"))
    order = await place(engine)
    await deliver(engine, receipt_for(order, "inventory", "dead_lettered", error="boom"))
    await settle(engine, PLACED_AT + timedelta(minutes=4))
    assert await unsettled(engine) == set()
    await deliver(engine, receipt_for(order, "inventory", "replayed").model_copy(
        update={"received_at": PLACED_AT + timedelta(minutes=5)}))
    later = PLACED_AT + timedelta(minutes=6)
    await settle(engine, later)
    async with engine.connect() as conn:
        late = await OrderStore(conn).late_orders(later, DEADLINE)
    assert [o.order_id for o in late] == [order.order_id]


async def test_a_subscriber_registered_late_reopens_the_orders_placed_since_it_started(
        engine: AsyncEngine) -> None:
    """Logistics started before two orders but its announcement was read after they were
    settled: both are reopened and found late; an order placed before it started is not."""
    await deliver(engine, announced("inventory"))
    before_it = await place(engine, PLACED_AT)
    since = [await place(engine, PLACED_AT + timedelta(minutes=m)) for m in (2, 3)]
    for order in (before_it, *since):
        await deliver(engine, receipt_for(order, "inventory"))
    now = PLACED_AT + timedelta(minutes=10)
    await settle(engine, now)
    assert await unsettled(engine) == set()
    await deliver(engine, announced("logistics", PLACED_AT + timedelta(minutes=1)))
    assert await unsettled(engine) == {o.order_id for o in since}
    await settle(engine, now)
    async with engine.connect() as conn:
        late = await OrderStore(conn).late_orders(now, DEADLINE)
    assert {o.order_id for o in late} == {o.order_id for o in since}
    for order in since:
        await deliver(engine, receipt_for(order, "logistics"))
    await settle(engine, now)
    assert await unsettled(engine) == set()
    await deliver(engine, announced("logistics", now))  # a refresh reopens nothing
    assert await unsettled(engine) == set()


async def test_a_subscriber_that_starts_consuming_order_placed_reopens_orders(
        engine: AsyncEngine) -> None:
    """Known since T0 for another event, then announcing OrderPlaced: the orders placed
    since it was first seen expect it (as the fan-out reads the registry) and reopen."""
    await deliver(engine, announced("inventory"))
    await deliver(engine, announced("seller", T0, order_placed=False))
    order = await place(engine)
    await deliver(engine, receipt_for(order, "inventory"))
    now = PLACED_AT + timedelta(minutes=10)
    await settle(engine, now)
    assert await unsettled(engine) == set()
    await deliver(engine, announced("seller", now))
    assert await unsettled(engine) == {order.order_id}


async def test_the_trace_reads_receipts_outcomes_producers_and_the_confirmation(
        engine: AsyncEngine) -> None:
    """The store's trace: placed, published at the outbox's confirmation, the receipts of
    the OrderPlaced and of the outcome events, and each outcome with its producer."""
    await create_tables(engine, kit_metadata)
    await deliver(engine, announced("inventory"))
    order = await place(engine)
    async with engine.begin() as conn:
        await conn.execute(outbox.insert().values(
            event_id=str(order.event_id), event_type="OrderPlaced", body="{}",
            created_at=PLACED_AT, sent_at=PLACED_AT + timedelta(milliseconds=20), attempts=1,
            partition_key=str(order.order_id)))
    reserved = StockReserved(order_id=order.order_id, lines=(ReservedLine(sku="SKU-1",
                                                                          quantity=2),),
                             occurred_at=PLACED_AT + timedelta(seconds=2),
                             producer="inventory").caused(order, "inventory")
    await deliver(engine, receipt_for(order, "inventory"))
    await deliver(engine, reserved)
    own = receipt_for(reserved, "order").model_copy(
        update={"received_at": PLACED_AT + timedelta(seconds=3)})
    await deliver(engine, own)
    async with engine.connect() as conn:
        found = await OrderStore(conn).trace(order.order_id)
        assert await OrderStore(conn).trace(uuid.uuid4()) is None
    assert found is not None
    assert [(s.kind, s.service, s.since_placed_ms) for s in found.steps] == [
        ("placed", "order", 0.0), ("published", "order", 20.0),
        ("receipt", "inventory", 1000.0), ("outcome", "inventory", 2000.0),
        ("receipt", "order", 3000.0)]
    assert found.steps[3].what == "StockReserved: reserved 1 line(s)"
    assert found.steps[4].what == "StockReserved from order.x"


async def test_an_older_database_gets_the_producer_column(db_url: str) -> None:
    """An outcomes table from before `producer` existed: the column is added at start-up,
    twice is harmless, and outcomes with their producer are kept."""
    old = sa.MetaData()
    sa.Table("outcomes", old,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("order_id", sa.String(36), nullable=False),
             sa.Column("kind", sa.String(32), nullable=False),
             sa.Column("detail", sa.Text, nullable=False),
             sa.Column("at", UTCDateTime(), nullable=False),
             sa.Column("event_id", sa.String(36), nullable=False))
    engine = make_engine(db_url)
    try:
        await create_tables(engine, old)
        await create_tables(engine, metadata)  # the other tables; outcomes stays as it was
        await upgrade_schema(engine)
        await upgrade_schema(engine)
        async with engine.begin() as conn:
            order = make_order()
            await OrderStore(conn).add_order(order)
            await OrderStore(conn).record_outcome(order.order_id, "seller", {}, T0, uuid.uuid4(),
                                                  producer="seller")
            producers = (await conn.execute(sa.select(outcomes.c.producer))).scalars().all()
    finally:
        await engine.dispose()
    assert producers == ["seller"]


async def test_an_idempotency_key_names_one_order_per_customer(engine: AsyncEngine) -> None:
    """The order placed with a key is found by (customer, key); the same key again for the
    same customer is refused by the database; another customer may use it; no key, no
    limit."""
    first = place_order(NewOrder(customer_id="cust-1", lines=[LINE],
                                 shipping_address=make_address()), now=PLACED_AT)
    async with engine.begin() as conn:
        await OrderStore(conn).add_order(first, idempotency_key="key-1")
    async with engine.connect() as conn:
        found = await OrderStore(conn).order_for_key("cust-1", "key-1")
        assert await OrderStore(conn).order_for_key("cust-2", "key-1") is None
    assert found == (first, OrderState.ACCEPTED)
    again = place_order(NewOrder(customer_id="cust-1", lines=[LINE],
                                 shipping_address=make_address()), now=PLACED_AT)
    with pytest.raises(sa.exc.IntegrityError):
        async with engine.begin() as conn:
            await OrderStore(conn).add_order(again, idempotency_key="key-1")
    other = place_order(NewOrder(customer_id="cust-2", lines=[LINE],
                                 shipping_address=make_address()), now=PLACED_AT)
    async with engine.begin() as conn:
        await OrderStore(conn).add_order(other, idempotency_key="key-1")
    await place(engine)
    await place(engine)


async def test_an_older_orders_table_gets_the_idempotency_key_and_settled_mark(
        db_url: str) -> None:
    """An orders table from before Idempotency-Key and the settled mark: the columns and
    their indexes are added at start-up (twice is harmless); keyed orders are then kept
    once, and answered orders are settled."""
    old = sa.MetaData()
    sa.Table("orders", old,
             sa.Column("order_id", sa.String(36), primary_key=True),
             sa.Column("customer_id", sa.String(64), nullable=False),
             sa.Column("currency", sa.String(3), nullable=False),
             sa.Column("total", sa.Numeric(14, 2), nullable=False),
             sa.Column("placed_at", UTCDateTime(), nullable=False),
             sa.Column("state", sa.String(16), nullable=False),
             sa.Column("body", sa.Text, nullable=False),
             sa.Column("event_id", sa.String(36), nullable=False, unique=True))
    engine = make_engine(db_url)
    try:
        await create_tables(engine, old)
        await create_tables(engine, metadata)
        await upgrade_schema(engine)
        await upgrade_schema(engine)
        event = place_order(NewOrder(customer_id="cust-1", lines=[LINE],
                                     shipping_address=make_address()), now=PLACED_AT)
        async with engine.begin() as conn:
            await OrderStore(conn).add_order(event, idempotency_key="key-1")
        with pytest.raises(sa.exc.IntegrityError):
            async with engine.begin() as conn:
                await OrderStore(conn).add_order(
                    event.model_copy(update={"order_id": uuid.uuid4(), "event_id": uuid.uuid4()}),
                    idempotency_key="key-1")
        await settle(engine, PLACED_AT + timedelta(hours=1))  # nobody expected: answered
        assert await unsettled(engine) == set()
        async with engine.connect() as conn:
            indexes = await index_names(conn, "orders")
        assert {"uq_orders_idempotency", "ix_orders_unsettled"} <= indexes
    finally:
        await engine.dispose()


async def test_an_older_database_loses_the_redundant_deliveries_index(db_url: str) -> None:
    """Older code indexed deliveries.event_id on its own, beside the unique (event_id,
    subscriber, outcome) that starts with it: the upgrade drops it (twice is harmless) and
    receipts are still kept once per (event, subscriber, outcome)."""
    engine = make_engine(db_url)
    try:
        await create_tables(engine, metadata)
        async with engine.begin() as conn:
            await conn.execute(sa.text(
                "CREATE INDEX ix_deliveries_event_id ON deliveries (event_id)"))
            assert "ix_deliveries_event_id" in await index_names(conn, "deliveries")
        await upgrade_schema(engine)
        await upgrade_schema(engine)
        async with engine.begin() as conn:
            assert "ix_deliveries_event_id" not in await index_names(conn, "deliveries")
            receipt = DeliveryReceipt(subscriber="inventory", queue="inventory.order.placed",
                                      handled_event_id=str(uuid.uuid4()),
                                      handled_event_type="OrderPlaced", outcome="handled",
                                      received_at=T0, duration_ms=1.0)
            await OrderStore(conn).record_deliveries([receipt, receipt.model_copy(
                update={"event_id": uuid.uuid4()})])
            stored = (await conn.execute(sa.select(sa.func.count()).select_from(deliveries)
                                         )).scalar_one()
    finally:
        await engine.dispose()
    assert stored == 1
