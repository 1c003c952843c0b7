"""An order's timeline: placed, published, each receipt and each outcome, in time order."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from order_service.domain.order import SERVICE_NAME
from order_service.domain.views import OutcomeKind, outcome_detail

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
