"""The order: what a valid order is, the event that places it, and the states it goes through."""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from common.events import (
    CURRENCIES,
    MONEY_MAX,
    MONEY_PATTERN,
    MONEY_PLACES,
    Address,
    Currency,
    Money,
    OrderLine,
    OrderPlaced,
    Quantity,
    new_id,
)

SERVICE_NAME = "order"


#: Refused anywhere in submitted text: control characters (C0, DEL, C1: a NUL that PostgreSQL
#: cannot store, the ESC of a terminal sequence), line and paragraph separators, the
#: bidirectional overrides and isolates that make a name read otherwise than it is stored
#: ("Trojan Source"), and lone surrogates (no UTF-8 encodes them). No field of an order is
#: free text where a tab or a newline belongs.
_REFUSED_CHARACTER = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _kind(char: str) -> str:
    if "\ud800" <= char <= "\udfff":
        return "a lone surrogate"
    if unicodedata.category(char) == "Cc":
        return "a control character"
    return unicodedata.name(char).lower()


def refuse_control_characters(text: str) -> str:
    """`text` unchanged, or a validation error naming its first refused character and where
    it is (counting from 1, in the text as sent)."""
    found = _REFUSED_CHARACTER.search(text)
    if found is None:
        return text
    char = found.group()
    raise PydanticCustomError(
        "text_control_character",
        "U+{code_point} ({kind}) at position {position} is not allowed: text may not hold "
        "control characters, line separators, bidirectional overrides or lone surrogates",
        {"position": found.start() + 1, "code_point": f"{ord(char):04X}", "kind": _kind(char)})


def _plain_amount(value: Any) -> Any:
    """An amount given as text must be written plainly (what the schema's pattern says):
    "1e3" or " 5" would otherwise be read as numbers the customer did not write."""
    if isinstance(value, str) and not re.fullmatch(MONEY_PATTERN, value):
        raise PydanticCustomError(
            "money_format",
            "an amount is zero or more, with at most {places} decimal places, written as a "
            "number or as a string of digits with an optional point (\"19.99\")",
            {"places": MONEY_PLACES})
    return value


#: Money as a customer submits it.
SubmittedMoney = Annotated[Money, BeforeValidator(_plain_amount)]

# What a customer submits is read strictly: no unknown field at any level (a typo, "qty",
# must not silently drop a value the customer meant to send), no coercion ("2" or true for
# a quantity), no control characters. Events keep the tolerant reader instead (unknown
# fields ignored, so a producer can add one), and their OrderLine and Address are the same
# values: the input gets strict twins of those below rather than changing them, so no
# consumer of OrderPlaced or SellerNotified reads differently. `from_attributes` lets Python
# callers pass the events' OrderLine and Address, read (and checked) field by field.
_SUBMITTED = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True,
                        from_attributes=True)


class _Submitted(BaseModel):
    """Base of the input models: refuses control characters in every text field."""

    @field_validator("*", mode="before")
    @classmethod
    def _printable(cls, value: Any) -> Any:
        return refuse_control_characters(value) if isinstance(value, str) else value


class NewOrderLine(_Submitted, OrderLine):
    """An order line as a customer submits it."""

    model_config = _SUBMITTED

    quantity: Annotated[Quantity, Strict()]
    unit_price: SubmittedMoney


class NewAddress(_Submitted, Address):
    """A shipping address as a customer submits it."""

    model_config = _SUBMITTED


if TYPE_CHECKING:
    # For the type checker an order holds the events' values, which the twins are, so that
    # callers (tests, the benchmark) can build one from OrderLine and Address values.
    _Line = OrderLine
    _ShippingAddress = Address
else:
    _Line = NewOrderLine
    _ShippingAddress = NewAddress


#: An order that places: what the API's documentation shows (its tests place it).
EXAMPLE_ORDER: dict[str, Any] = {
    "customer_id": "cust-42",
    "lines": [{"sku": "SKU-BOOK-1", "quantity": 2, "unit_price": "19.99",
               "seller_id": "seller-books"}],
    "currency": "EUR",
    "shipping_address": {"name": "Ada Lovelace", "street": "12 Analytical Row",
                         "city": "Berlin", "postal_code": "10115", "country": "DE"},
    "total": "39.98",
}


class NewOrder(_Submitted):
    """What a customer submits: validated before anything is stored or published."""

    model_config = ConfigDict(**_SUBMITTED, json_schema_extra={"examples": [EXAMPLE_ORDER]})

    customer_id: str = Field(min_length=1, max_length=64, description="Who orders.",
                             examples=["cust-42"])
    # A list, not a tuple: pydantic then reports only the bad line, without a spurious
    # "too short" for the whole list.
    lines: list[_Line] = Field(min_length=1, max_length=100, description="What is ordered.")
    currency: Currency = "EUR"
    shipping_address: _ShippingAddress
    # Validated when left out too: the sum of the lines becomes the total then, and must
    # respect Money's limit like a given total.
    total: SubmittedMoney | None = Field(
        default=None, validate_default=True, examples=["39.98"],
        description="Optional: when given it must equal the sum of the lines, "
                    "a check against a client that priced the basket differently.")

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        if value not in CURRENCIES:
            raise ValueError(f"{value!r} is not a supported ISO 4217 currency "
                             f"(one of {', '.join(sorted(CURRENCIES))})")
        return value

    @field_validator("total")
    @classmethod
    def _total_adds_up(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        lines = info.data.get("lines")
        # When the lines are invalid their own errors are reported; no total to compare.
        if lines is None:
            return value
        expected = lines_total(lines)
        if value is None and expected > MONEY_MAX:
            raise PydanticCustomError(
                "total_too_large",
                "the lines add up to {expected}, more than an order's total can be "
                "({limit}): split the order",
                {"expected": str(expected), "limit": str(MONEY_MAX)})
        if value is not None and value != expected:
            raise ValueError(f"total {value} does not equal the sum of the lines {expected}")
        return value


def lines_total(lines: Iterable[OrderLine]) -> Decimal:
    """The sum of quantity x unit price over the lines."""
    return sum((line.line_total for line in lines), Decimal("0.00"))


#: What makes two placements the same order (ids and times aside).
_ORDER_CONTENT = {"customer_id", "lines", "currency", "total", "shipping_address"}


def same_order(a: OrderPlaced, b: OrderPlaced) -> bool:
    """Whether two OrderPlaced events place the same order, whatever their ids and times."""
    return a.model_dump(include=_ORDER_CONTENT) == b.model_dump(include=_ORDER_CONTENT)


def place_order(order: NewOrder, *, order_id: uuid.UUID | None = None,
                now: datetime | None = None) -> OrderPlaced:
    """The `OrderPlaced` event for a validated order; the order id starts its flow."""
    order_id = order_id or new_id()
    fields: dict[str, Any] = {
        "order_id": order_id,
        "correlation_id": str(order_id),
        "producer": SERVICE_NAME,
        "customer_id": order.customer_id,
        # Plain values, so the event holds the events' own OrderLine and Address rather than
        # the input's strict twins (which would not compare equal to a decoded event's).
        "lines": [line.model_dump() for line in order.lines],
        "currency": order.currency,
        "total": order.total if order.total is not None else lines_total(order.lines),
        "shipping_address": order.shipping_address.model_dump(),
    }
    if now is not None:
        fields["occurred_at"] = now
    return OrderPlaced(**fields)


class OrderState(StrEnum):
    """Where an order is in its flow."""

    #: Stored with its `OrderPlaced` in the outbox; not yet known to be published.
    ACCEPTED = "accepted"
    #: Published: the kit does not report each publish, so the first receipt or outcome
    #: about the order is the proof that it left.
    PLACED = "placed"
    #: Inventory reserved every line.
    CONFIRMED = "confirmed"
    #: Inventory could not reserve every line, so it reserved none.
    REJECTED = "rejected"


_RANK = {OrderState.ACCEPTED: 0, OrderState.PLACED: 1,
         OrderState.CONFIRMED: 2, OrderState.REJECTED: 2}


def advance(current: OrderState, seen: OrderState) -> OrderState:
    """The state after learning `seen`; never backwards, and a final state stays final.

    Events of one flow travel on different exchanges and can arrive in any order (a
    `StockReserved` before the receipt that proves `OrderPlaced` was published), so a
    late, weaker fact must not undo a stronger one.
    """
    return seen if _RANK[seen] > _RANK[current] else current
