"""The event contract: validation, the envelope, tolerant reading, and decoding deliveries."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from common.events import (
    EVENT_TYPES,
    Address,
    Event,
    OrderLine,
    OrderPlaced,
    ReservedLine,
    StockReserved,
)
from common.kit.runner import PoisonMessageError, decode

pytestmark = pytest.mark.unit


def order_payload(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "order_id": str(uuid.uuid4()),
        "customer_id": "cust-1",
        "lines": [
            {"sku": "SKU-1", "quantity": 2, "unit_price": "2.50", "seller_id": "s1"},
            {"sku": "SKU-2", "quantity": 1, "unit_price": "0.99", "seller_id": "s2"},
        ],
        "currency": "eur",
        "total": "5.99",
        "shipping_address": {"name": "Ada", "street": "1 Row", "city": "Berlin",
                             "postal_code": "10115", "country": "de"},
    }
    payload.update(overrides)
    return payload


def test_a_valid_order_placed_normalises_codes_and_fills_the_envelope() -> None:
    """Currency and country are upper-cased; event id, type, version and UTC time are set."""
    event = OrderPlaced.model_validate(order_payload())
    assert event.currency == "EUR"
    assert event.shipping_address.country == "DE"
    assert event.event_type == "OrderPlaced"
    assert event.schema_version == 1
    assert isinstance(event.event_id, uuid.UUID)
    assert event.occurred_at.utcoffset() is not None
    assert event.total == Decimal("5.99")


@pytest.mark.parametrize(("change", "where"), [
    ({"total": "6.00"}, "does not equal the sum"),
    ({"currency": "XYZ"}, "not a supported ISO 4217"),
    ({"currency": "EURO"}, "currency"),
    ({"lines": []}, "lines"),
])
def test_an_inconsistent_order_is_refused(change: dict[str, Any], where: str) -> None:
    """A total that does not add up, an unknown currency or no lines are refused."""
    with pytest.raises(ValidationError, match=where):
        OrderPlaced.model_validate(order_payload(**change))


@pytest.mark.parametrize(("line_change", "field"), [
    ({"quantity": 0}, "quantity"),
    ({"quantity": -1}, "quantity"),
    ({"unit_price": "-1.00"}, "unit_price"),
    ({"unit_price": "1.001"}, "unit_price"),
    ({"sku": ""}, "sku"),
    ({"sku": "has space"}, "sku"),
])
def test_a_bad_line_is_refused_naming_the_field(line_change: dict[str, Any], field: str) -> None:
    """Quantity >= 1, a non-negative price with cents, and a well-formed SKU are required."""
    line = {"sku": "SKU-1", "quantity": 1, "unit_price": "1.00", "seller_id": "s1"}
    line.update(line_change)
    with pytest.raises(ValidationError) as caught:
        OrderLine.model_validate(line)
    assert any(field in map(str, err["loc"]) for err in caught.value.errors())


def test_a_bad_country_code_is_refused() -> None:
    """The shipping country is an ISO 3166 alpha-2 code."""
    with pytest.raises(ValidationError, match="country"):
        Address(name="A", street="B", city="C", postal_code="1", country="DEU")


def test_events_are_frozen() -> None:
    """An event is a fact: it cannot be changed after it is built."""
    event = OrderPlaced.model_validate(order_payload())
    with pytest.raises(ValidationError):
        event.customer_id = "someone else"


def test_a_reader_ignores_fields_it_does_not_know() -> None:
    """Tolerant reader: a producer may add a field without breaking any consumer."""
    event = OrderPlaced.model_validate(order_payload(gift_wrap=True))
    assert "gift_wrap" not in event.model_dump()


def test_the_tolerant_reader_holds_inside_lines_and_the_address_too() -> None:
    """Only what a customer submits is read strictly: an event with unknown fields in a
    line or the address, or a quantity written as text, still reads."""
    payload = order_payload()
    payload["lines"][0].update(gift_note="thanks", quantity="2")
    payload["shipping_address"]["floor"] = 3
    event = OrderPlaced.model_validate_json(json.dumps(payload))
    assert event.lines[0].quantity == 2
    assert "gift_note" not in event.lines[0].model_dump()
    assert "floor" not in event.shipping_address.model_dump()


def test_money_states_its_limits_in_the_schema() -> None:
    """A reader of the contract learns Money's bounds and places without a 422."""
    price = OrderLine.model_json_schema()["properties"]["unit_price"]
    number = next(branch for branch in price["anyOf"] if branch["type"] == "number")
    assert (number["minimum"], number["maximum"], number["multipleOf"]) == (
        0, 999999999999.99, 0.01)
    assert "999999999999.99" in price["description"]


def test_json_round_trip_keeps_money_exact() -> None:
    """Money travels as a decimal string, never a float."""
    event = OrderPlaced.model_validate(order_payload())
    wire = json.loads(event.model_dump_json())
    assert wire["total"] == "5.99"
    assert OrderPlaced.model_validate_json(event.model_dump_json()) == event


def test_caused_places_an_event_in_its_causes_flow() -> None:
    """Correlation comes from the cause, causation is the cause's id, producer is set."""
    cause = OrderPlaced.model_validate(order_payload(correlation_id="flow-1"))
    effect = StockReserved(order_id=cause.order_id,
                           lines=(ReservedLine(sku="SKU-1", quantity=2),)).caused(cause, "inv")
    assert effect.correlation_id == "flow-1"
    assert effect.causation_id == cause.event_id
    assert effect.producer == "inv"


def test_the_catalog_names_every_event_once() -> None:
    """Each event type maps to its class, with a routing name of its own (bar the audit)."""
    assert all(cls.model_fields["event_type"].default == name
               for name, cls in EVENT_TYPES.items())
    business = [cls.routing for cls in EVENT_TYPES.values() if cls.routing != "audit"]
    assert len(business) == len(set(business))
    assert all(issubclass(cls, Event) for cls in EVENT_TYPES.values())


class _Delivery:
    """The two attributes of an incoming message that decoding reads."""

    def __init__(self, body: bytes, type_: str | None = None) -> None:
        self.body = body
        self.type = type_


async def _handler(event: Any, store: Any) -> list[Event]:
    return []


HANDLERS: dict[str, Any] = {"OrderPlaced": (OrderPlaced, _handler)}


def test_decode_returns_the_event_and_its_handler() -> None:
    """A well-formed delivery decodes to its event and the handler for its type."""
    body = json.dumps(order_payload(event_type="OrderPlaced")).encode()
    event, handler = decode(_Delivery(body), HANDLERS)  # type: ignore[arg-type]
    assert isinstance(event, OrderPlaced)
    assert handler is _handler


@pytest.mark.parametrize(("body", "type_", "reason"), [
    (b"{not json", None, "not valid JSON"),
    (b"\xff\xfe", None, "not valid JSON"),
    (b"[1, 2]", None, "not an object"),
    (json.dumps({"event_type": "PaymentTaken"}).encode(), None, "unknown event type"),
    (json.dumps({"x": 1}).encode(), None, "unknown event type"),
    (json.dumps(order_payload(event_type="OrderPlaced", total="1")).encode(), None,
     "does not match OrderPlaced schema"),
])
def test_decode_names_what_is_wrong_with_a_poison_message(body: bytes, type_: str | None,
                                                          reason: str) -> None:
    """Bad JSON, a non-object, an unknown type or a schema mismatch: PoisonMessageError."""
    with pytest.raises(PoisonMessageError, match=reason):
        decode(_Delivery(body, type_), HANDLERS)  # type: ignore[arg-type]


def test_new_events_and_orders_get_time_ordered_ids() -> None:
    """Ids made one after another sort in that order (version 7), so the tables indexed by
    them take each new row at the end; and they survive the wire unchanged."""
    from order_service.domain.order import NewOrder, place_order

    order = NewOrder(customer_id="cust-1", currency="EUR", lines=[OrderLine(
        sku="SKU-1", quantity=1, unit_price=Decimal("5.00"), seller_id="seller-1")],
        shipping_address=Address(name="A", street="B 1", city="C", postal_code="1",
                                 country="DE"))
    events = [place_order(order) for _ in range(200)]
    assert all(e.event_id.version == 7 and e.order_id.version == 7 for e in events)
    assert [e.event_id for e in events] == sorted(e.event_id for e in events)
    assert [e.order_id for e in events] == sorted(e.order_id for e in events)
    again = OrderPlaced.model_validate_json(events[0].model_dump_json())
    assert (again.event_id, again.order_id) == (events[0].event_id, events[0].order_id)
