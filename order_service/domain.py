"""Pure order rules: what a valid order is, its states, and how far its fan-out got."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from common.events import CURRENCIES, Address, Currency, Money, OrderLine, OrderPlaced

SERVICE_NAME = "order"


class NewOrder(BaseModel):
    """What a customer submits: validated before anything is stored or published."""

    # Unknown fields are refused here (unlike events): a typo in an order ("qty") must not
    # silently drop a value the customer meant to send.
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    customer_id: str = Field(min_length=1, max_length=64, description="Who orders.",
                             examples=["cust-42"])
    # A list, not a tuple: pydantic then reports only the bad line, without a spurious
    # "too short" for the whole list.
    lines: list[OrderLine] = Field(min_length=1, max_length=100,
                                   description="What is ordered.")
    currency: Currency = "EUR"
    shipping_address: Address
    total: Money | None = Field(
        default=None,
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
        if value is None or lines is None:
            return value
        expected = lines_total(lines)
        if value != expected:
            raise ValueError(f"total {value} does not equal the sum of the lines {expected}")
        return value


def lines_total(lines: Iterable[OrderLine]) -> Decimal:
    """The sum of quantity x unit price over the lines."""
    return sum((line.line_total for line in lines), Decimal("0.00"))


def place_order(order: NewOrder, *, order_id: uuid.UUID | None = None,
                now: datetime | None = None) -> OrderPlaced:
    """The `OrderPlaced` event for a validated order; the order id starts its flow."""
    order_id = order_id or uuid.uuid4()
    fields: dict[str, Any] = {
        "order_id": order_id,
        "correlation_id": str(order_id),
        "producer": SERVICE_NAME,
        "customer_id": order.customer_id,
        "lines": order.lines,
        "currency": order.currency,
        "total": order.total if order.total is not None else lines_total(order.lines),
        "shipping_address": order.shipping_address,
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
SubscriberOutcome = Literal["handled", "failed", "retrying", "pending"]

#: What a subscriber's latest unsuccessful receipt makes of it: a delivery waiting in a delay
#: queue is retrying; one sent back from the dead-letter queue is pending again.
_UNSUCCESSFUL: dict[str, SubscriberOutcome] = {
    "dead_lettered": "failed", "retried": "retrying", "replayed": "pending"}


@dataclass(frozen=True)
class Receipt:
    """What one subscriber reported about one delivery of the order's `OrderPlaced`."""

    subscriber: str
    outcome: ReceiptOutcome
    at: datetime
    error: str | None = None
    duration_ms: float | None = None


class SubscriberStatus(BaseModel):
    """One subscriber's answer (or silence) about an order."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The subscribing service.", examples=["inventory"])
    expected: bool = Field(description="Registered for OrderPlaced when the order was placed.")
    status: SubscriberOutcome = Field(
        description="handled; failed (in its dead-letter queue); retrying (failed, waiting in a "
                    "delay queue); or pending (no answer yet, or replayed from the DLQ).")
    outcome: ReceiptOutcome | None = Field(
        default=None, description="The receipt the status comes from, if any.")
    error: str | None = Field(default=None, description="Why it failed, when it did.")
    at: datetime | None = Field(default=None, description="When the delivery arrived.")
    duration_ms: float | None = Field(default=None, description="How long it took.")


class FanOut(BaseModel):
    """Did every subscriber handle the order's `OrderPlaced`?"""

    model_config = ConfigDict(frozen=True)

    subscribers: tuple[SubscriberStatus, ...]
    complete: bool = Field(description="No subscriber is pending.")

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.subscribers if s.status == "pending")

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


def fan_out(expected: Iterable[str], receipts: Iterable[Receipt]) -> FanOut:
    """Per subscriber, handled / failed / pending, from the expected set and the receipts.

    Subscribers that answered without being expected (they announced themselves after the
    order was placed, but their queue got the event) are listed too, marked unexpected.
    """
    expected_set = set(expected)
    by_subscriber: dict[str, list[Receipt]] = {}
    for receipt in receipts:
        by_subscriber.setdefault(receipt.subscriber, []).append(receipt)
    statuses: list[SubscriberStatus] = []
    for name in sorted(expected_set | by_subscriber.keys()):
        mine = by_subscriber.get(name)
        if not mine:
            statuses.append(SubscriberStatus(name=name, expected=True, status="pending"))
            continue
        receipt = _decisive(mine)
        statuses.append(SubscriberStatus(
            name=name,
            expected=name in expected_set,
            status=_UNSUCCESSFUL.get(receipt.outcome, "handled"),
            outcome=receipt.outcome,
            error=receipt.error,
            at=receipt.at,
            duration_ms=receipt.duration_ms,
        ))
    return FanOut(subscribers=tuple(statuses),
                  complete=all(s.status in ("handled", "failed") for s in statuses))


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
    pending: int = Field(description="Expected subscribers that have not answered.")


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

