"""The event envelope and every event model: the contract between services."""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

# Tolerant reader: unknown fields are ignored so a producer can add one without breaking
# any consumer; a breaking change bumps `schema_version` instead.
_MODEL_CONFIG = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)

# ISO 4217 codes we accept. A closed list rather than a regex so "ABC" is refused; extend
# it when a shop sells in another currency.
CURRENCIES = frozenset(
    {"EUR", "USD", "GBP", "CHF", "SEK", "NOK", "DKK", "PLN", "CZK", "JPY", "CAD", "AUD"}
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


if sys.version_info >= (3, 14):
    from uuid import uuid7
else:
    from uuid6 import uuid7


def new_id() -> uuid.UUID:
    """A new id for an event or an order: a time-ordered UUID (version 7, RFC 9562).

    Every table keyed or indexed by these ids (orders, the inbox, the outbox, receipts) then
    takes new rows at the end of its index instead of on a random page: the pages being
    written stay in the database's cache however many rows the tables hold, where random
    (version 4) ids make each insert read and rewrite a page from anywhere in the file.
    MassTransit's NewId and NServiceBus's COMB ids are the same idea.
    """
    return uuid7()


def _upper(value: str) -> str:
    return value.upper()


Sku = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
          description="Stock keeping unit.", examples=["SKU-BOOK-1"]),
]
SellerId = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
          description="The seller who ships this line.", examples=["seller-books"]),
]
# The pattern before the validator: pydantic leaves out of the JSON Schema (the contract
# readers see) a constraint that follows an AfterValidator, though it still checks it.
CountryCode = Annotated[
    str,
    Field(pattern=r"^[A-Za-z]{2}$", description="ISO 3166-1 alpha-2 country code.",
          examples=["DE"]),
    AfterValidator(_upper),
]
Currency = Annotated[
    str,
    Field(pattern=r"^[A-Za-z]{3}$", description="ISO 4217 currency code.", examples=["EUR"]),
    AfterValidator(_upper),
]
#: Money's limits: never negative, at most MONEY_DIGITS digits, MONEY_PLACES of them after
#: the point; MONEY_MAX is the largest amount (999999999999.99).
MONEY_DIGITS = 14
MONEY_PLACES = 2
MONEY_MAX = Decimal(10) ** (MONEY_DIGITS - MONEY_PLACES) - Decimal(10) ** -MONEY_PLACES
#: An amount written as text: digits, then at most two decimals after a point.
MONEY_PATTERN = rf"^[0-9]{{1,{MONEY_DIGITS - MONEY_PLACES}}}(\.[0-9]{{1,{MONEY_PLACES}}})?$"
Money = Annotated[
    Decimal,
    Field(ge=0, max_digits=MONEY_DIGITS, decimal_places=MONEY_PLACES,
          description=f"An amount in the order's currency: 0 to {MONEY_MAX}, at most "
                      f"{MONEY_PLACES} decimal places; a string (\"19.99\") or a number.",
          examples=["19.99"]),
    # Pydantic's schema for a Decimal names neither the digits nor the places: say them, as
    # JSON Schema can (a reader of the OpenAPI document should not learn them from a 422).
    WithJsonSchema({"anyOf": [
        {"type": "string", "pattern": MONEY_PATTERN},
        {"type": "number", "minimum": 0, "maximum": float(MONEY_MAX),
         "multipleOf": float(Decimal(10) ** -MONEY_PLACES)},
    ]}, mode="validation"),
]
Quantity = Annotated[int, Field(ge=1, le=10_000, description="How many units.", examples=[2])]


class Model(BaseModel):
    """Base for value objects carried inside events."""

    model_config = _MODEL_CONFIG


class OrderLine(Model):
    """One line of an order: a quantity of one SKU sold by one seller."""

    sku: Sku
    quantity: Quantity
    unit_price: Money
    seller_id: SellerId

    @property
    def line_total(self) -> Decimal:
        return self.unit_price * self.quantity


class Address(Model):
    """Where the order ships to.

    Its text is not checked for control characters here: the order service refuses them where
    a customer submits an order (`order_service.domain.order.NewOrder`), and a reader that refused
    them (a subscriber, the order service reading its own orders) would turn the orders
    accepted before that check into poison.
    """

    name: str = Field(min_length=1, max_length=200, description="Recipient.",
                      examples=["Ada Lovelace"])
    street: str = Field(min_length=1, max_length=200, description="Street and number.",
                        examples=["12 Analytical Row"])
    city: str = Field(min_length=1, max_length=100, description="City.", examples=["Berlin"])
    postal_code: str = Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9 -]+$",
                             description="Postal code.", examples=["10115"])
    country: CountryCode


class Event(BaseModel):
    """The envelope every event carries; subclasses add the payload.

    On the wire the AMQP properties repeat it (message_id, type, correlation_id,
    timestamp, app_id), so a broker tool can read it without parsing the body.
    """

    model_config = _MODEL_CONFIG

    #: The exchange name (before any prefix): one durable fanout exchange per event type.
    routing: ClassVar[str]

    event_id: uuid.UUID = Field(default_factory=new_id,
                                description="Unique id of this event; consumers dedupe on it.")
    event_type: str = Field(description="The event's name, past tense.",
                            examples=["OrderPlaced"])
    schema_version: int = Field(default=1, ge=1,
                                description="Bumped on a breaking change of the payload.")
    occurred_at: datetime = Field(default_factory=_utcnow,
                                  description="When it happened (UTC).")
    correlation_id: str | None = Field(
        default=None, max_length=128,
        description="The flow this event belongs to: the order id for the order flow. "
                    "Filled from the causing event when left empty.")
    causation_id: uuid.UUID | None = Field(
        default=None, description="The event_id of the event that caused this one.")
    producer: str | None = Field(default=None, max_length=64,
                                 description="The service that produced it.")

    @model_validator(mode="after")
    def _utc(self) -> Self:
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone")
        return self

    def caused(self, cause: Event, producer: str) -> Self:
        """This event, placed in `cause`'s flow: same correlation, causation set."""
        return self.model_copy(update={
            "correlation_id": self.correlation_id or cause.correlation_id,
            "causation_id": self.causation_id or cause.event_id,
            "producer": self.producer or producer,
        })

    @property
    def order_key(self) -> str | None:
        """The order this event is about, for logs and the per-order status."""
        order_id = getattr(self, "order_id", None)
        return str(order_id) if order_id is not None else self.correlation_id


class OrderPlaced(Event):
    """A customer placed an order; every subscriber reacts on its own."""

    routing: ClassVar[str] = "order.placed"
    event_type: Literal["OrderPlaced"] = "OrderPlaced"

    order_id: uuid.UUID = Field(description="The order.")
    customer_id: str = Field(min_length=1, max_length=64, description="Who ordered.",
                             examples=["cust-42"])
    lines: tuple[OrderLine, ...] = Field(min_length=1, max_length=100,
                                         description="What was ordered.")
    currency: Currency
    total: Money
    shipping_address: Address

    @model_validator(mode="after")
    def _check_total(self) -> Self:
        if self.currency not in CURRENCIES:
            raise ValueError(f"currency {self.currency!r} is not a supported ISO 4217 code "
                             f"(one of {', '.join(sorted(CURRENCIES))})")
        expected = sum((line.line_total for line in self.lines), Decimal(0))
        if self.total != expected:
            raise ValueError(f"total {self.total} does not equal the sum of the lines {expected}")
        return self


class ReservedLine(Model):
    """A line inventory reserved."""

    sku: Sku
    quantity: int = Field(ge=1, description="Units reserved.")


class UnreservableLine(Model):
    """A line inventory could not reserve, and why."""

    sku: Sku
    requested: int = Field(ge=1, description="Units the order asked for.")
    available: int = Field(ge=0, description="Units in stock when the order arrived.")
    reason: Literal["unknown_sku", "insufficient_stock"] = Field(
        description="Why it could not be reserved.")


class StockReserved(Event):
    """Every line of the order is reserved."""

    routing: ClassVar[str] = "stock.reserved"
    event_type: Literal["StockReserved"] = "StockReserved"

    order_id: uuid.UUID = Field(description="The order.")
    lines: tuple[ReservedLine, ...] = Field(min_length=1, description="What was reserved.")


class StockReservationFailed(Event):
    """At least one line could not be reserved, so none was."""

    routing: ClassVar[str] = "stock.reservation_failed"
    event_type: Literal["StockReservationFailed"] = "StockReservationFailed"

    order_id: uuid.UUID = Field(description="The order.")
    reason: str = Field(description="Summary for people.",
                        examples=["not enough stock for SKU-BOOK-1"])
    lines: tuple[UnreservableLine, ...] = Field(min_length=1,
                                                description="The lines that failed.")


class ShipmentScheduled(Event):
    """Logistics scheduled the order's shipment."""

    routing: ClassVar[str] = "shipment.scheduled"
    event_type: Literal["ShipmentScheduled"] = "ShipmentScheduled"

    order_id: uuid.UUID = Field(description="The order.")
    shipment_id: uuid.UUID = Field(description="The shipment.")
    carrier: str = Field(min_length=1, max_length=64, description="Who carries it.",
                         examples=["DHL"])
    tracking_number: str = Field(min_length=1, max_length=64,
                                 description="Carrier's tracking number.",
                                 examples=["DHL-4F7A9C21"])
    estimated_delivery: date = Field(description="Expected delivery date.")


class SellerNotified(Event):
    """One seller was told about its lines of an order."""

    routing: ClassVar[str] = "seller.notified"
    event_type: Literal["SellerNotified"] = "SellerNotified"

    order_id: uuid.UUID = Field(description="The order.")
    seller_id: SellerId
    lines: tuple[OrderLine, ...] = Field(min_length=1, description="That seller's lines.")


class SubscriberAnnounced(Event):
    """A subscriber started: who it is and what it consumes (the audit registry)."""

    routing: ClassVar[str] = "audit"
    event_type: Literal["SubscriberAnnounced"] = "SubscriberAnnounced"

    subscriber: str = Field(description="The subscribing service.", examples=["inventory"])
    instance: str = Field(description="This process (host:pid).")
    consumes: dict[str, str] = Field(
        description="Event type -> the queue it is consumed from.",
        examples=[{"OrderPlaced": "inventory.order.placed"}])


class DeliveryReceipt(Event):
    """What a subscriber did with one delivery: closes choreography's blind spot."""

    routing: ClassVar[str] = "audit"
    event_type: Literal["DeliveryReceipt"] = "DeliveryReceipt"

    subscriber: str = Field(description="The subscribing service.")
    queue: str = Field(description="The queue the delivery came from.")
    handled_event_id: str | None = Field(
        description="event_id of the delivery (None when the body could not be read).")
    handled_event_type: str | None = Field(description="Its event type, when known.")
    outcome: Literal["handled", "duplicate", "retried", "dead_lettered", "replayed"] = Field(
        description="handled; duplicate (handled before, no second effect); retried (failed, "
                    "waiting in a delay queue); dead_lettered (parked in <queue>.dlq); "
                    "replayed (an operator sent it back from the dead-letter queue).")
    attempt: int | None = Field(default=None, ge=1,
                                description="Which failed attempt this was, for failures.")
    error: str | None = Field(default=None, description="Why it failed, when it did.")
    received_at: datetime = Field(description="When the delivery arrived.")
    duration_ms: float = Field(ge=0, description="Time from arrival to outcome.")


class DeliveryReceipts(Event):
    """The receipts of deliveries a subscriber handled together, in one transaction.

    Under load the runner handles the deliveries waiting on a queue as one batch, and their
    receipts travel as one message: auditing then costs a small part of the events it
    audits instead of one more message each.
    """

    routing: ClassVar[str] = "audit"
    event_type: Literal["DeliveryReceipts"] = "DeliveryReceipts"

    subscriber: str = Field(description="The subscribing service.")
    queue: str = Field(description="The queue the deliveries came from.")
    receipts: tuple[DeliveryReceipt, ...] = Field(min_length=1,
                                                  description="One per delivery, in order.")


def receipts_of(event: Event) -> tuple[DeliveryReceipt, ...]:
    """The receipts an audit event carries: one, several, or none (an announcement)."""
    if isinstance(event, DeliveryReceipts):
        return event.receipts
    if isinstance(event, DeliveryReceipt):
        return (event,)
    return ()


#: The events the kit itself sends, on every service's behalf, to the audit exchange.
KIT_EVENTS: frozenset[type[Event]] = frozenset(
    {SubscriberAnnounced, DeliveryReceipt, DeliveryReceipts})

#: Every event type, by name: the catalog and the decoder's lookup table.
EVENT_TYPES: dict[str, type[Event]] = {
    cls.model_fields["event_type"].default: cls
    for cls in (OrderPlaced, StockReserved, StockReservationFailed, ShipmentScheduled,
                SellerNotified, SubscriberAnnounced, DeliveryReceipt, DeliveryReceipts)
}
