"""The order as the API and the CLI show it: its status, a line of a list, its outcomes."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from common.events import Address, OrderLine, OrderPlaced
from order_service.domain.fanout import SubscriberOutcome, SubscriberStatus
from order_service.domain.order import OrderState

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
