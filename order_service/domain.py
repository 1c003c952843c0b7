"""Pure order rules: what a valid order is, its states, and how far its fan-out got."""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

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


# --- fan-out status ---------------------------------------------------------------------

ReceiptOutcome = Literal["handled", "duplicate", "retried", "dead_lettered", "replayed"]
SubscriberOutcome = Literal["handled", "failed", "retrying", "pending", "late"]

#: What a subscriber's latest unsuccessful receipt makes of it: a delivery waiting in a delay
#: queue is retrying; one sent back from the dead-letter queue is pending again.
_UNSUCCESSFUL: dict[str, SubscriberOutcome] = {
    "dead_lettered": "failed", "retried": "retrying", "replayed": "pending"}

#: A subscriber in one of these has given its final answer; any other status can turn late.
FINAL: frozenset[str] = frozenset({"handled", "failed"})


@dataclass(frozen=True)
class Receipt:
    """What one subscriber reported about one delivery of the order's `OrderPlaced`."""

    subscriber: str
    outcome: ReceiptOutcome
    at: datetime
    error: str | None = None
    duration_ms: float | None = None
    #: The queue the delivery came from; its dead-letter queue is this name + ".dlq".
    queue: str | None = None


class SubscriberStatus(BaseModel):
    """One subscriber's answer (or silence) about an order."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The subscribing service.", examples=["inventory"])
    expected: bool = Field(description="Registered for OrderPlaced when the order was placed.")
    status: SubscriberOutcome = Field(
        description="handled; failed (in its dead-letter queue); retrying (failed, waiting in a "
                    "delay queue); pending (no answer yet, or replayed from the DLQ); or late "
                    "(an expected subscriber with no final answer within the deadline, "
                    "ORDER_LATE_AFTER).")
    late: bool = Field(default=False,
                       description="No final answer (handled or failed) within the deadline.")
    outcome: ReceiptOutcome | None = Field(
        default=None, description="The receipt the status comes from, if any.")
    error: str | None = Field(default=None, description="Why it failed, when it did.")
    dead_letter_queue: str | None = Field(
        default=None, description="Where the failed delivery waits for an operator, when failed.",
        examples=["logistics.order.placed.dlq"])
    at: datetime | None = Field(default=None, description="When the delivery arrived.")
    duration_ms: float | None = Field(default=None, description="How long it took.")


class FanOut(BaseModel):
    """Did every subscriber handle the order's `OrderPlaced`?"""

    model_config = ConfigDict(frozen=True)

    subscribers: tuple[SubscriberStatus, ...]
    complete: bool = Field(description="Every expected subscriber gave its final answer; one "
                                       "that joined later (caught up) is shown, never waited "
                                       "for.")

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.subscribers if s.status == "pending")

    @property
    def unanswered(self) -> tuple[str, ...]:
        """Subscribers without a final answer yet: pending, retrying or late."""
        return tuple(s.name for s in self.subscribers if s.status not in FINAL)

    @property
    def late(self) -> bool:
        return any(s.late for s in self.subscribers)

    def count(self, status: SubscriberOutcome) -> int:
        return sum(1 for s in self.subscribers if s.status == status)


def _decisive(receipts: list[Receipt]) -> Receipt:
    """The receipt that says what a subscriber did.

    A success wins over a failure whatever their order: a dead-lettered delivery replayed
    later and handled is handled, and a redelivery of a handled event (duplicate) does not
    undo it. Among failures, the latest tells the current error.
    """
    successes = [r for r in receipts if r.outcome not in _UNSUCCESSFUL]
    pool = successes or receipts
    return max(pool, key=lambda r: r.at)


def is_late(since: datetime, now: datetime, late_after: timedelta) -> bool:
    """More than `late_after` has passed since `since` (the deadline is exclusive)."""
    return now - since > late_after


def fan_out(expected: Iterable[str], receipts: Iterable[Receipt], *,
            placed_at: datetime | None = None, now: datetime | None = None,
            late_after: timedelta | None = None) -> FanOut:
    """Per subscriber, handled / failed / retrying / pending / late, from the expected set
    and the receipts.

    Subscribers that answered without being expected (they announced themselves after the
    order was placed, but their queue got the event, or `shop catch-up` gave it to them)
    are listed too, marked unexpected; the order is complete without them.

    With `placed_at`, `now` and `late_after`, an expected subscriber without a final answer
    (handled or failed) more than `late_after` after the order was placed is late. An
    operator's replay from the dead-letter queue starts its clock again: the subscriber gets
    the same time to answer the replayed delivery.
    """
    expected_set = set(expected)
    by_subscriber: dict[str, list[Receipt]] = {}
    for receipt in receipts:
        by_subscriber.setdefault(receipt.subscriber, []).append(receipt)
    statuses: list[SubscriberStatus] = []
    for name in sorted(expected_set | by_subscriber.keys()):
        mine = by_subscriber.get(name, [])
        decisive = _decisive(mine) if mine else None
        status: SubscriberOutcome = ("pending" if decisive is None
                                     else _UNSUCCESSFUL.get(decisive.outcome, "handled"))
        late = False
        if (placed_at is not None and now is not None and late_after is not None
                and name in expected_set and status not in FINAL):
            replays = [r.at for r in mine if r.outcome == "replayed"]
            late = is_late(max([placed_at, *replays]), now, late_after)
        dlq = (f"{decisive.queue}.dlq" if decisive is not None and status == "failed"
               and decisive.queue else None)
        statuses.append(SubscriberStatus(
            name=name,
            expected=name in expected_set,
            status="late" if late else status,
            late=late,
            outcome=decisive.outcome if decisive else None,
            error=decisive.error if decisive else None,
            dead_letter_queue=dlq,
            at=decisive.at if decisive else None,
            duration_ms=decisive.duration_ms if decisive else None,
        ))
    return FanOut(subscribers=tuple(statuses),
                  complete=all(s.status in FINAL for s in statuses if s.expected))


# --- what the API and the CLI show ------------------------------------------------------

OutcomeKind = Literal["stock_reserved", "stock_failed", "shipment", "seller"]


class Outcome(BaseModel):
    """A domain outcome another service reported about the order."""

    model_config = ConfigDict(frozen=True)

    kind: OutcomeKind = Field(description="stock_reserved, stock_failed, shipment or seller.")
    at: datetime = Field(description="When it happened.")
    detail: dict[str, Any] = Field(description="The event's payload that matters here.")


class OrderView(BaseModel):
    """The order as it was placed."""

    model_config = ConfigDict(frozen=True)

    order_id: uuid.UUID
    customer_id: str
    lines: tuple[OrderLine, ...]
    currency: str
    total: Decimal
    shipping_address: Address
    placed_at: datetime

    @classmethod
    def of(cls, event: OrderPlaced) -> Self:
        return cls(order_id=event.order_id, customer_id=event.customer_id, lines=event.lines,
                   currency=event.currency, total=event.total,
                   shipping_address=event.shipping_address, placed_at=event.occurred_at)


class OrderStatus(BaseModel):
    """Everything known about an order: `GET /orders/{id}` and `shop order status`."""

    model_config = ConfigDict(frozen=True)

    order: OrderView
    state: OrderState
    complete: bool = Field(description="Every expected subscriber has answered.")
    subscribers: tuple[SubscriberStatus, ...]
    outcomes: tuple[Outcome, ...]


class SubscriberLight(BaseModel):
    """One subscriber's status in an order summary: a light on a row."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(examples=["inventory"])
    status: SubscriberOutcome


class OrderSummary(BaseModel):
    """One line of `GET /orders`."""

    model_config = ConfigDict(frozen=True)

    order_id: uuid.UUID
    customer_id: str
    currency: str
    total: Decimal
    placed_at: datetime
    state: OrderState
    handled: int = Field(description="Subscribers that handled OrderPlaced.")
    failed: int = Field(description="Subscribers that dead-lettered it.")
    pending: int = Field(description="Expected subscribers that have not answered yet.")
    retrying: int = Field(0, description="Subscribers waiting to retry a failed delivery.")
    late: int = Field(0, description="Expected subscribers with no final answer in time.")
    subscribers: tuple[SubscriberLight, ...] = Field(
        (), description="Each subscriber's status, by name.")


class Subscriber(BaseModel):
    """An entry of the registry the subscribers' announcements build."""

    model_config = ConfigDict(frozen=True)

    name: str
    consumes: dict[str, str] = Field(description="Event type -> queue.")
    instance: str = Field(description="The last process that announced it (host:pid).")
    first_seen: datetime
    last_seen: datetime


def outcome_detail(kind: OutcomeKind, detail: Mapping[str, Any]) -> str:
    """One readable line for an outcome (the CLI's table)."""
    if kind == "stock_reserved":
        lines = detail.get("lines", [])
        return f"reserved {len(lines)} line(s)"
    if kind == "stock_failed":
        return str(detail.get("reason", "stock reservation failed"))
    if kind == "shipment":
        eta = detail.get("estimated_delivery")
        when = eta.isoformat() if isinstance(eta, date) else eta
        return (f"{detail.get('carrier')} {detail.get('tracking_number')}, "
                f"delivery by {when}")
    lines = detail.get("lines", [])
    return f"seller {detail.get('seller_id')} notified of {len(lines)} line(s)"



# --- the order's trace ------------------------------------------------------------------

TraceKind = Literal["placed", "published", "receipt", "outcome"]

#: The event each outcome kind comes from.
OUTCOME_EVENTS: dict[str, str] = {
    "stock_reserved": "StockReserved", "stock_failed": "StockReservationFailed",
    "shipment": "ShipmentScheduled", "seller": "SellerNotified"}

#: Where each step kind sorts among steps at the same instant.
_KIND_RANK = {"placed": 0, "published": 1, "receipt": 2, "outcome": 3}


class TraceStep(BaseModel):
    """One step of an order's journey across the services."""

    model_config = ConfigDict(frozen=True)

    at: datetime = Field(description="When it happened.")
    since_placed_ms: float = Field(description="Milliseconds since the order was placed.")
    service: str = Field(description="The service that took the step.", examples=["inventory"])
    kind: TraceKind = Field(description="placed, published, receipt or outcome.")
    what: str = Field(description="What happened, in a line.")
    outcome: str | None = Field(default=None,
                                description="A receipt's outcome, or an outcome's kind.")
    duration_ms: float | None = Field(default=None, description="How long the step took.")


class OrderTrace(BaseModel):
    """`GET /orders/{id}/trace`: the order's timeline, oldest step first."""

    model_config = ConfigDict(frozen=True)

    order_id: uuid.UUID
    steps: tuple[TraceStep, ...]


@dataclass(frozen=True)
class TracedReceipt:
    """A receipt about any event of the order's flow (its OrderPlaced or an outcome)."""

    subscriber: str
    queue: str
    event_type: str | None
    outcome: str
    at: datetime
    duration_ms: float | None
    error: str | None = None


@dataclass(frozen=True)
class TracedOutcome:
    """An outcome event about the order, and who produced it."""

    kind: OutcomeKind
    at: datetime
    producer: str | None
    detail: Mapping[str, Any]


def trace(order_id: uuid.UUID, placed_at: datetime, *, published_at: datetime | None,
          receipts: Iterable[TracedReceipt], outcomes: Iterable[TracedOutcome]) -> OrderTrace:
    """The order's steps in time order.

    `published_at` is when the broker confirmed the OrderPlaced (from the outbox). A
    subscriber can get the event before that confirmation reaches the publisher, and the
    outbox forgets sent rows after the retention period, so the published step is at the
    earlier of the confirmation and the first receipt of the OrderPlaced.
    """
    receipts = list(receipts)
    steps: list[TraceStep] = []

    def step(at: datetime, service: str, kind: TraceKind, what: str,
             outcome: str | None = None, duration_ms: float | None = None) -> None:
        steps.append(TraceStep(at=at, since_placed_ms=round((at - placed_at).total_seconds()
                                                            * 1000, 3),
                               service=service, kind=kind, what=what, outcome=outcome,
                               duration_ms=duration_ms))

    step(placed_at, SERVICE_NAME, "placed", "OrderPlaced stored with the order (outbox)")
    first = min((r.at for r in receipts if r.event_type == "OrderPlaced"), default=None)
    if published_at is not None and (first is None or published_at <= first):
        step(published_at, SERVICE_NAME, "published", "OrderPlaced published (broker confirmed)")
    elif first is not None and published_at is not None:
        later = (published_at - first).total_seconds() * 1000
        step(first, SERVICE_NAME, "published", "OrderPlaced published (first receipt; the "
             f"broker's confirmation reached the order service {later:.1f} ms later)")
    elif first is not None:
        step(first, SERVICE_NAME, "published", "OrderPlaced published (proved by the first "
             "receipt)")
    for r in receipts:
        what = f"{r.event_type or 'unreadable message'} from {r.queue}"
        if r.error:
            what += f": {r.error}"
        step(r.at, r.subscriber, "receipt", what, r.outcome, r.duration_ms)
    for o in outcomes:
        step(o.at, o.producer or "unknown", "outcome",
             f"{OUTCOME_EVENTS.get(o.kind, o.kind)}: {outcome_detail(o.kind, o.detail)}",
             o.kind)
    steps.sort(key=lambda s: (s.at, _KIND_RANK[s.kind]))
    return OrderTrace(order_id=order_id, steps=tuple(steps))
