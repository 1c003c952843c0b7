"""Order rules: what a valid order is, how its state moves, how its fan-out is judged."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from common.events import Address, OrderLine, OrderPlaced
from order_service.domain.fanout import Receipt, fan_out
from order_service.domain.order import EXAMPLE_ORDER, NewOrder, OrderState, advance, place_order
from order_service.domain.timeline import TracedOutcome, TracedReceipt, trace
from order_service.domain.views import outcome_detail

pytestmark = pytest.mark.unit

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def order_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_id": "cust-1",
        "lines": [
            {"sku": "SKU-BOOK-1", "quantity": 2, "unit_price": "19.99", "seller_id": "books"},
            {"sku": "SKU-MUG-1", "quantity": 1, "unit_price": "5.00", "seller_id": "mugs"},
        ],
        "currency": "EUR",
        "shipping_address": {"name": "Ada", "street": "1 Row", "city": "Berlin",
                             "postal_code": "10115", "country": "de"},
    }
    body.update(changes)
    return body


def error_fields(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, str]:
    return {".".join(map(str, e["loc"])): e["msg"] for e in exc.value.errors()}


def test_valid_order_without_total_gets_the_sum_of_its_lines() -> None:
    """A valid order builds an OrderPlaced whose total is the sum of the lines."""
    event = place_order(NewOrder.model_validate(order_body()))
    assert event.total == Decimal("44.98")
    assert event.shipping_address.country == "DE"


def test_placed_event_starts_its_own_flow() -> None:
    """The order id is the correlation id, and the producer is the order service."""
    order_id = uuid.uuid4()
    event = place_order(NewOrder.model_validate(order_body()), order_id=order_id, now=T0)
    assert event.order_id == order_id
    assert event.correlation_id == str(order_id)
    assert event.producer == "order"
    assert event.occurred_at == T0
    assert event.causation_id is None


def test_each_placement_gets_a_new_order_id() -> None:
    """Two placements of the same body are two orders."""
    new = NewOrder.model_validate(order_body())
    assert place_order(new).order_id != place_order(new).order_id


def test_a_total_that_adds_up_is_accepted() -> None:
    """A given total equal to the sum of the lines is kept."""
    assert place_order(NewOrder.model_validate(order_body(total="44.98"))).total == Decimal(
        "44.98")


def test_a_total_that_does_not_add_up_is_refused_on_the_total_field() -> None:
    """A given total other than the sum is an error on `total` saying both amounts."""
    with pytest.raises(ValidationError) as exc:
        NewOrder.model_validate(order_body(total="40.00"))
    fields = error_fields(exc)
    assert "total" in fields
    assert "40.00" in fields["total"]
    assert "44.98" in fields["total"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"customer_id": ""}, "customer_id"),
        ({"lines": []}, "lines"),
        ({"currency": "XYZ"}, "currency"),
        ({"currency": "EURO"}, "currency"),
        ({"shipping_address": {"name": "Ada"}}, "shipping_address.street"),
        ({"lines": [{"sku": "A", "quantity": 0, "unit_price": "1", "seller_id": "s"}]},
         "lines.0.quantity"),
        ({"lines": [{"sku": "A", "quantity": -1, "unit_price": "1", "seller_id": "s"}]},
         "lines.0.quantity"),
        ({"lines": [{"sku": "A", "quantity": "two", "unit_price": "1", "seller_id": "s"}]},
         "lines.0.quantity"),
        ({"lines": [{"sku": "A", "quantity": 1, "unit_price": "-1", "seller_id": "s"}]},
         "lines.0.unit_price"),
        ({"lines": [{"sku": "A", "quantity": 1, "unit_price": "1.001", "seller_id": "s"}]},
         "lines.0.unit_price"),
        ({"lines": [{"sku": "A", "quantity": 1, "unit_price": "1"}]}, "lines.0.seller_id"),
        ({"qty": 3}, "qty"),
    ],
)
def test_bad_input_is_refused_on_the_field_at_fault(change: dict[str, Any], field: str) -> None:
    """Each kind of bad input is reported on the field that is wrong."""
    with pytest.raises(ValidationError) as exc:
        NewOrder.model_validate(order_body(**change))
    assert field in error_fields(exc)


def test_missing_fields_are_each_named() -> None:
    """An empty body names every required field."""
    with pytest.raises(ValidationError) as exc:
        NewOrder.model_validate({})
    assert set(error_fields(exc)) == {"customer_id", "lines", "shipping_address"}


def test_unsupported_currency_message_lists_the_supported_ones() -> None:
    """A well-formed but unsupported currency says which ones are supported."""
    with pytest.raises(ValidationError) as exc:
        NewOrder.model_validate(order_body(currency="xyz"))
    assert "EUR" in error_fields(exc)["currency"]


def with_line(**changes: Any) -> dict[str, Any]:
    line = {"sku": "SKU-1", "quantity": 1, "unit_price": "1.00", "seller_id": "s"}
    return order_body(lines=[{**line, **changes}])


def with_address(**changes: Any) -> dict[str, Any]:
    return order_body(shipping_address={**order_body()["shipping_address"], **changes})


@pytest.mark.parametrize(("body", "field", "says"), [
    (order_body(customer_id="cust\x00"), "customer_id", "U+0000 (a control character) at "
                                                         "position 5"),
    (with_address(name="\x1b[2JAda"), "shipping_address.name", "U+001B (a control character) "
                                                              "at position 1"),
    (with_address(street="1 Row\u0085"), "shipping_address.street", "U+0085"),
    (with_address(city="Ber\u202elin"), "shipping_address.city",
     "U+202E (right-to-left override) at position 4"),
    (with_address(name="Ada\u2069"), "shipping_address.name", "U+2069 (pop directional "
                                                               "isolate)"),
    (with_address(name="A\ud83d"), "shipping_address.name", "U+D83D (a lone surrogate)"),
    (with_address(name="Ada\nLovelace"), "shipping_address.name", "U+000A"),
    (with_address(postal_code="101\t15"), "shipping_address.postal_code", "U+0009"),
    (with_line(seller_id="s\x7f"), "lines.0.seller_id", "U+007F"),
])
def test_text_with_control_characters_is_refused_saying_which_and_where(
        body: dict[str, Any], field: str, says: str) -> None:
    """Control characters, bidi overrides and isolates, lone surrogates: refused on their
    field, naming the code point and its position in the text as sent."""
    with pytest.raises(ValidationError) as exc:
        NewOrder.model_validate(body)
    assert says in error_fields(exc)[field]


def test_text_in_any_script_is_kept() -> None:
    """Accents, right-to-left scripts and emoji sequences (joined by ZWJ) are ordinary text."""
    name = "Zoë Ñúñez 李雷 مريم 👩\u200d👩\u200d👧"
    order = NewOrder.model_validate(with_address(name=f"  {name} "))
    assert order.shipping_address.name == name


@pytest.mark.parametrize(("body", "field"), [
    (with_line(quantity="2"), "lines.0.quantity"),
    (with_line(quantity=True), "lines.0.quantity"),
    (with_line(quantity=2.0), "lines.0.quantity"),
    (with_line(unit_price="1e2"), "lines.0.unit_price"),
    (with_line(unit_price=" 1.00"), "lines.0.unit_price"),
    (order_body(total="4.498e1"), "total"),
    (with_line(qty=2), "lines.0.qty"),
    (with_address(floor=3), "shipping_address.floor"),
])
def test_submitted_values_are_not_coerced_and_unknown_fields_are_refused_at_every_level(
        body: dict[str, Any], field: str) -> None:
    """A quantity is a JSON integer, an amount a number or plain decimal text; an unknown
    field in a line or the address is refused as at the top."""
    with pytest.raises(ValidationError) as exc:
        NewOrder.model_validate(body)
    assert field in error_fields(exc)


def test_amounts_may_be_json_numbers() -> None:
    """A number with cents reads as the same exact amount as its text."""
    order = NewOrder.model_validate(with_line(quantity=3, unit_price=19.99))
    assert place_order(order).total == Decimal("59.97")


def test_a_computed_total_over_moneys_limit_is_refused_on_the_total() -> None:
    """Lines that add up past the largest amount are an error on `total` saying the limit,
    not a failure when the event is built."""
    huge = {"sku": "SKU-1", "quantity": 10_000, "unit_price": "999999999999.99",
            "seller_id": "s"}
    with pytest.raises(ValidationError) as exc:
        NewOrder.model_validate(order_body(lines=[huge]))
    assert "999999999999.99" in error_fields(exc)["total"]
    largest = {**huge, "quantity": 1}
    assert place_order(NewOrder.model_validate(order_body(lines=[largest]))).total == Decimal(
        "999999999999.99")


def test_the_event_holds_the_events_own_values() -> None:
    """The input's strict lines and address become the event's plain OrderLine and Address,
    so the event equals itself read back from the wire."""
    event = place_order(NewOrder.model_validate(order_body()))
    assert {type(line) for line in event.lines} == {OrderLine}
    assert type(event.shipping_address) is Address
    assert OrderPlaced.model_validate_json(event.model_dump_json()) == event


def test_an_order_can_be_built_from_the_events_values() -> None:
    """Python callers may pass OrderLine and Address values; they are checked all the same."""
    address = Address(name="Ada", street="1 Row", city="Berlin", postal_code="1", country="DE")
    line = OrderLine(sku="SKU-1", quantity=2, unit_price=Decimal("1.50"), seller_id="s")
    assert place_order(NewOrder(customer_id="c", lines=[line],
                                shipping_address=address)).total == Decimal("3.00")
    with pytest.raises(ValidationError, match="U\\+001B"):
        NewOrder(customer_id="c", lines=[line], shipping_address=address.model_copy(
            update={"name": "\x1b"}))


def test_the_documented_example_is_a_valid_order() -> None:
    """The example the API documents validates, total included."""
    assert place_order(NewOrder.model_validate(EXAMPLE_ORDER)).total == Decimal(
        EXAMPLE_ORDER["total"])


@pytest.mark.parametrize(
    ("current", "seen", "expected"),
    [
        (OrderState.ACCEPTED, OrderState.PLACED, OrderState.PLACED),
        (OrderState.ACCEPTED, OrderState.CONFIRMED, OrderState.CONFIRMED),
        (OrderState.PLACED, OrderState.REJECTED, OrderState.REJECTED),
        (OrderState.CONFIRMED, OrderState.PLACED, OrderState.CONFIRMED),
        (OrderState.REJECTED, OrderState.ACCEPTED, OrderState.REJECTED),
        (OrderState.CONFIRMED, OrderState.REJECTED, OrderState.CONFIRMED),
        (OrderState.PLACED, OrderState.PLACED, OrderState.PLACED),
    ],
)
def test_state_only_moves_forward(current: OrderState, seen: OrderState,
                                  expected: OrderState) -> None:
    """A late, weaker fact never undoes a stronger one, and a final state stays final."""
    assert advance(current, seen) == expected


def receipt(name: str, outcome: str, minutes: int = 0, error: str | None = None) -> Receipt:
    return Receipt(subscriber=name, outcome=outcome,  # type: ignore[arg-type]
                   at=T0 + timedelta(minutes=minutes), error=error, duration_ms=1.5)


def test_fan_out_marks_each_expected_subscriber() -> None:
    """Handled, dead-lettered and silent subscribers show as handled, failed, pending."""
    fan = fan_out(["inventory", "logistics", "seller"], [
        receipt("inventory", "handled"),
        receipt("logistics", "dead_lettered", error="KeyError: 'FR'"),
    ])
    by_name = {s.name: s for s in fan.subscribers}
    assert by_name["inventory"].status == "handled"
    assert by_name["logistics"].status == "failed"
    assert by_name["logistics"].error == "KeyError: 'FR'"
    assert by_name["seller"].status == "pending"
    assert fan.pending == ("seller",)
    assert not fan.complete


def test_fan_out_is_complete_when_nobody_is_pending() -> None:
    """A failure still counts as an answer: the fan-out is complete."""
    fan = fan_out(["a", "b"], [receipt("a", "handled"), receipt("b", "dead_lettered")])
    assert fan.complete
    assert (fan.count("handled"), fan.count("failed"), fan.count("pending")) == (1, 1, 0)


def test_a_duplicate_delivery_counts_as_handled() -> None:
    """A redelivery of a handled event reports duplicate; the subscriber handled it."""
    fan = fan_out(["a"], [receipt("a", "duplicate")])
    assert fan.subscribers[0].status == "handled"
    assert fan.subscribers[0].outcome == "duplicate"


def test_success_wins_over_failure_whatever_the_order() -> None:
    """A dead-lettered delivery later replayed and handled is handled, and stays so."""
    replayed = fan_out(["a"], [receipt("a", "dead_lettered", 0), receipt("a", "handled", 5)])
    assert replayed.subscribers[0].status == "handled"
    late_failure = fan_out(["a"], [receipt("a", "handled", 0), receipt("a", "dead_lettered", 5)])
    assert late_failure.subscribers[0].status == "handled"


def test_the_latest_failure_gives_the_error() -> None:
    """Among failures only, the latest error is shown."""
    fan = fan_out(["a"], [receipt("a", "dead_lettered", 0, "old"),
                          receipt("a", "dead_lettered", 5, "new")])
    assert fan.subscribers[0].error == "new"


def test_a_subscriber_that_joined_later_is_listed_as_unexpected() -> None:
    """A receipt from a subscriber not expected at placement is shown, marked unexpected."""
    fan = fan_out(["a"], [receipt("a", "handled"), receipt("audit", "handled")])
    by_name = {s.name: s for s in fan.subscribers}
    assert by_name["a"].expected
    assert not by_name["audit"].expected
    assert by_name["audit"].status == "handled"
    assert fan.complete


def test_a_subscriber_that_joined_later_never_holds_the_order_open() -> None:
    """Catching up, a subscriber the order did not expect may still be retrying or replayed:
    it shows so, and the order stays complete once its expected subscribers answered."""
    fan = fan_out(["a"], [receipt("a", "handled"), receipt("b", "retried"),
                          receipt("c", "replayed")])
    assert [(s.name, s.status, s.expected) for s in fan.subscribers] == [
        ("a", "handled", True), ("b", "retrying", False), ("c", "pending", False)]
    assert fan.complete


def test_no_subscribers_is_trivially_complete() -> None:
    """With no expected subscriber and no receipt there is nothing to wait for."""
    fan = fan_out([], [])
    assert fan.subscribers == ()
    assert fan.complete


def test_outcome_details_read_as_one_line() -> None:
    """Each outcome kind gets a short readable summary."""
    assert outcome_detail("stock_reserved", {"lines": [{}, {}]}) == "reserved 2 line(s)"
    assert outcome_detail("stock_failed", {"reason": "not enough SKU-1"}) == "not enough SKU-1"
    assert outcome_detail("shipment", {"carrier": "DHL", "tracking_number": "DHL-1",
                                       "estimated_delivery": "2025-01-03"}) == (
        "DHL DHL-1, delivery by 2025-01-03")
    assert outcome_detail("seller", {"seller_id": "books", "lines": [{}]}) == (
        "seller books notified of 1 line(s)")


def test_a_subscriber_waiting_to_retry_is_retrying_and_not_complete() -> None:
    """A failure that will be retried is neither handled nor final."""
    fan = fan_out(["a"], [receipt("a", "retried", 0)])
    assert [s.status for s in fan.subscribers] == ["retrying"]
    assert not fan.complete
    retried_then_handled = fan_out(["a"], [receipt("a", "retried", 0), receipt("a", "handled", 5)])
    assert [s.status for s in retried_then_handled.subscribers] == ["handled"]


def test_a_dead_letter_replayed_by_an_operator_is_pending_again() -> None:
    """Replayed from the DLQ: pending until the subscriber answers once more."""
    fan = fan_out(["a"], [receipt("a", "dead_lettered", 0), receipt("a", "replayed", 5)])
    assert [s.status for s in fan.subscribers] == ["pending"]
    assert not fan.complete


# --- late --------------------------------------------------------------------------------

DEADLINE = timedelta(seconds=30)


def judged(expected: list[str], receipts: list[Receipt], seconds: float
           ) -> dict[str, tuple[str, bool]]:
    """The fan-out `seconds` after placement at T0, with a 30 s deadline: name -> status."""
    fan = fan_out(expected, receipts, placed_at=T0, now=T0 + timedelta(seconds=seconds),
                  late_after=DEADLINE)
    return {s.name: (s.status, s.late) for s in fan.subscribers}


def test_a_silent_subscriber_is_pending_until_the_deadline_then_late() -> None:
    """No receipt: pending at the deadline itself, late a moment after it."""
    assert judged(["a"], [], 30) == {"a": ("pending", False)}
    assert judged(["a"], [], 30.001) == {"a": ("late", True)}


def test_a_final_answer_is_never_late() -> None:
    """Handled or failed (dead-lettered) long after the deadline stays handled or failed."""
    receipts = [receipt("a", "handled", 5), receipt("b", "dead_lettered", 5)]
    assert judged(["a", "b"], receipts, 3600) == {"a": ("handled", False),
                                                  "b": ("failed", False)}


def test_a_subscriber_still_retrying_after_the_deadline_is_late() -> None:
    """A retried delivery is not a final answer: past the deadline it is late, error kept."""
    fan = fan_out(["a"], [receipt("a", "retried", 0, error="TimeoutError")], placed_at=T0,
                  now=T0 + timedelta(minutes=1), late_after=DEADLINE)
    [status] = fan.subscribers
    assert (status.status, status.late, status.error) == ("late", True, "TimeoutError")
    assert not fan.complete
    assert fan.unanswered == ("a",)


def test_a_replay_gives_the_subscriber_a_new_deadline() -> None:
    """Replayed from the DLQ at minute 5: pending until 30 s after the replay, then late."""
    receipts = [receipt("a", "dead_lettered", 1), receipt("a", "replayed", 5)]
    assert judged(["a"], receipts, 5 * 60 + 29) == {"a": ("pending", False)}
    assert judged(["a"], receipts, 5 * 60 + 31) == {"a": ("late", True)}


def test_only_expected_subscribers_can_be_late() -> None:
    """A subscriber that joined after the order was placed is shown, never late."""
    assert judged(["a"], [receipt("a", "handled"), receipt("b", "retried")], 600) == {
        "a": ("handled", False), "b": ("retrying", False)}


def test_without_a_clock_nobody_is_late() -> None:
    """Without placement time, now and deadline, the fan-out judges no lateness."""
    fan = fan_out(["a"], [])
    assert [(s.status, s.late) for s in fan.subscribers] == [("pending", False)]


def test_a_failed_subscriber_names_its_dead_letter_queue() -> None:
    """Failed: the queue of the decisive receipt + ".dlq"; other statuses have none."""
    fan = fan_out(["a", "b"], [
        Receipt(subscriber="a", outcome="dead_lettered", at=T0, error="boom",
                queue="p.a.order.placed"),
        Receipt(subscriber="b", outcome="handled", at=T0, queue="p.b.order.placed")])
    by_name = {s.name: s for s in fan.subscribers}
    assert by_name["a"].dead_letter_queue == "p.a.order.placed.dlq"
    assert by_name["b"].dead_letter_queue is None


def test_the_trace_orders_steps_in_time_and_measures_from_placement() -> None:
    """Placed, published, receipts and outcomes sorted by time, with ms since placement."""
    order_id = uuid.uuid4()
    at = [T0 + timedelta(milliseconds=ms) for ms in range(0, 100, 10)]
    result = trace(order_id, T0, published_at=None, receipts=[
        TracedReceipt("logistics", "p.logistics.order.placed", "OrderPlaced", "handled", at[3],
                      4.0),
        TracedReceipt("inventory", "p.inventory.order.placed", "OrderPlaced", "handled", at[2],
                      3.0),
        TracedReceipt("order", "p.order.stock.reserved", "StockReserved", "handled", at[5], 1.0),
    ], outcomes=[TracedOutcome("stock_reserved", at[4], "inventory", {"lines": [{}]})])
    steps = [(s.kind, s.service, s.since_placed_ms) for s in result.steps]
    assert steps == [("placed", "order", 0.0), ("published", "order", 20.0),
                     ("receipt", "inventory", 20.0), ("receipt", "logistics", 30.0),
                     ("outcome", "inventory", 40.0), ("receipt", "order", 50.0)]
    assert result.steps[4].what == "StockReserved: reserved 1 line(s)"
    assert result.steps[2].duration_ms == 3.0


def test_the_trace_prefers_the_broker_confirmation_for_publication() -> None:
    """With the outbox's confirmation time, the published step says so and uses it."""
    published = T0 + timedelta(milliseconds=7)
    result = trace(uuid.uuid4(), T0, published_at=published, receipts=[], outcomes=[])
    assert [(s.kind, s.at) for s in result.steps] == [("placed", T0), ("published", published)]
    assert "broker confirmed" in result.steps[1].what


def test_a_receipt_before_the_confirmation_dates_the_publication() -> None:
    """A subscriber got the event before the confirm reached the publisher: published at
    that first receipt, still before it in the steps."""
    receipt_at = T0 + timedelta(milliseconds=5)
    result = trace(uuid.uuid4(), T0, published_at=T0 + timedelta(milliseconds=9), receipts=[
        TracedReceipt("a", "p.a.order.placed", "OrderPlaced", "handled", receipt_at, 1.0)],
        outcomes=[])
    assert [(s.kind, s.at) for s in result.steps] == [
        ("placed", T0), ("published", receipt_at), ("receipt", receipt_at)]
    assert "4.0 ms later" in result.steps[1].what
