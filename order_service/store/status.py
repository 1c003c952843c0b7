"""What is read about orders: an order's status, a page of the list, its timeline, each with
the fan-out its receipts make."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from common.kit.outbox import outbox
from order_service.domain.fanout import FanOut, Receipt, ReceiptOutcome, fan_out
from order_service.domain.order import OrderState
from order_service.domain.timeline import OrderTrace, TracedOutcome, TracedReceipt, trace
from order_service.domain.views import (
    OrderStatus,
    OrderSummary,
    OrderView,
    Outcome,
    SubscriberLight,
)
from order_service.store.orders import Orders
from order_service.store.tables import deliveries, order_expectations, orders, outcomes

#: Orders whose fan-out a listing works out between two turns of the event loop: SQLite
#: runs inline on the loop, so a page read in one go would hold everything else up for
#: as long as the whole page takes.
_SLICE = 50
#: What a line of a list is read from.
SUMMARY_COLUMNS = (orders.c.order_id, orders.c.customer_id, orders.c.currency, orders.c.total,
                   orders.c.placed_at, orders.c.state, orders.c.event_id)


@dataclass(frozen=True)
class Position:
    """Where a page of the order list ended: its last order. Lists run newest first, by
    placement time, ties by order id (`LISTED`), so the next page starts just past it."""

    placed_at: datetime
    order_id: uuid.UUID

    @classmethod
    def of(cls, summary: OrderSummary) -> Position:
        return cls(summary.placed_at, summary.order_id)


#: The order of every list: newest first; the order id breaks ties.
LISTED = (orders.c.placed_at.desc(), orders.c.order_id)


def past(position: Position | None) -> list[sa.ColumnElement[bool]]:
    """The orders listed after `position` (keyset paging: the placement index leads
    straight there, however deep the page)."""
    if position is None:
        return []
    placed_at, order_id = position.placed_at, str(position.order_id)
    # The first condition alone is what the index can search on; the second trims the
    # orders placed at that very time which the previous page already listed.
    return [orders.c.placed_at <= placed_at,
            sa.or_(orders.c.placed_at < placed_at, orders.c.order_id > order_id)]


class Status(Orders):
    """The reading part of the order store."""

    async def status(self, order_id: uuid.UUID, *, now: datetime | None = None,
                     late_after: timedelta | None = None) -> OrderStatus | None:
        """The order, its state, who handled its OrderPlaced, and the outcomes so far.

        With `now` and `late_after`, expected subscribers silent for longer are late.
        """
        found = await self.get_order(order_id)
        if found is None:
            return None
        event, state = found
        fan = (await self._fan_outs({str(order_id): str(event.event_id)}, now=now,
                                    late_after=late_after))[str(order_id)]
        rows = (await self.conn.execute(
            sa.select(outcomes).where(outcomes.c.order_id == str(order_id))
            .order_by(outcomes.c.at, outcomes.c.id))).all()
        return OrderStatus(
            order=OrderView.of(event),
            state=state,
            complete=fan.complete,
            subscribers=fan.subscribers,
            outcomes=tuple(Outcome(kind=r.kind, at=r.at, detail=json.loads(r.detail))
                           for r in rows),
        )

    async def list_orders(self, limit: int = 50, *, after: Position | None = None,
                          now: datetime | None = None,
                          late_after: timedelta | None = None) -> list[OrderSummary]:
        """The latest orders first (those listed after `after`, when given), each with its
        fan-out counts and lights."""
        rows = (await self.conn.execute(
            sa.select(*SUMMARY_COLUMNS).where(*past(after)).order_by(*LISTED)
            .limit(limit))).all()
        return await self._summaries(rows, now=now, late_after=late_after)

    async def _summaries(self, rows: Sequence[Any], *, now: datetime | None,
                         late_after: timedelta | None) -> list[OrderSummary]:
        summaries: list[OrderSummary] = []
        for start in range(0, len(rows), _SLICE):
            if start:
                await asyncio.sleep(0)  # let the loop serve others between slices
            summaries += await self._slice_summaries(rows[start:start + _SLICE], now=now,
                                                     late_after=late_after)
        return summaries

    async def _slice_summaries(self, rows: Sequence[Any], *, now: datetime | None,
                               late_after: timedelta | None) -> list[OrderSummary]:
        fans = await self._fan_outs({r.order_id: r.event_id for r in rows}, now=now,
                                    late_after=late_after)
        summaries = []
        for r in rows:
            fan = fans[r.order_id]
            summaries.append(OrderSummary(
                order_id=uuid.UUID(r.order_id), customer_id=r.customer_id,
                currency=r.currency, total=r.total, placed_at=r.placed_at,
                state=OrderState(r.state), handled=fan.count("handled"),
                failed=fan.count("failed"), pending=fan.count("pending"),
                retrying=fan.count("retrying"), late=fan.count("late"),
                subscribers=tuple(SubscriberLight(name=s.name, status=s.status)
                                  for s in fan.subscribers)))
        return summaries

    async def trace(self, order_id: uuid.UUID) -> OrderTrace | None:
        """The order's timeline: placed, published, every receipt of its flow, outcomes."""
        row = (await self.conn.execute(
            sa.select(orders.c.placed_at, orders.c.event_id)
            .where(orders.c.order_id == str(order_id)))).first()
        if row is None:
            return None
        # When the broker confirmed its OrderPlaced: the outbox keeps sent rows for the
        # retention period; after that the first receipt stands in.
        published_at = (await self.conn.execute(
            sa.select(sa.func.min(outbox.c.sent_at)).where(
                outbox.c.event_id == row.event_id))).scalar()
        receipts = [TracedReceipt(subscriber=d.subscriber, queue=d.queue,
                                  event_type=d.event_type, outcome=d.outcome,
                                  at=d.received_at, duration_ms=d.duration_ms, error=d.error)
                    for d in (await self.conn.execute(
                        sa.select(deliveries).where(sa.or_(
                            deliveries.c.order_id == str(order_id),
                            deliveries.c.event_id == row.event_id)))).all()]
        found = [TracedOutcome(kind=o.kind, at=o.at, producer=o.producer,
                               detail=json.loads(o.detail))
                 for o in (await self.conn.execute(
                     sa.select(outcomes).where(outcomes.c.order_id == str(order_id)))).all()]
        return trace(order_id, row.placed_at, published_at=published_at, receipts=receipts,
                     outcomes=found)

    async def _fan_outs(self, event_ids: Mapping[str, str], *, now: datetime | None = None,
                        late_after: timedelta | None = None) -> dict[str, FanOut]:
        """Fan-out of each order (order id -> its OrderPlaced event id), in a few queries."""
        if not event_ids:
            return {}
        expected: dict[str, list[str]] = {order_id: [] for order_id in event_ids}
        for row in (await self.conn.execute(sa.select(order_expectations).where(
                order_expectations.c.order_id.in_(list(event_ids))))).all():
            expected[row.order_id].append(row.subscriber)
        # Also every subscriber that had started (its announcement's own time) before the
        # order was placed, even if the tracker read that announcement only afterwards:
        # services starting together must not make the first orders expect nobody.
        placed = {r.order_id: r.placed_at for r in (await self.conn.execute(
            sa.select(orders.c.order_id, orders.c.placed_at)
            .where(orders.c.order_id.in_(list(event_ids))))).all()}
        registry = [s for s in await self.list_subscribers() if "OrderPlaced" in s.consumes]
        for order_id, placed_at in placed.items():
            expected[order_id].extend(s.name for s in registry
                                      if s.first_seen <= placed_at
                                      and s.name not in expected[order_id])
        order_of = {event_id: order_id for order_id, event_id in event_ids.items()}
        receipts: dict[str, list[Receipt]] = {order_id: [] for order_id in event_ids}
        for row in (await self.conn.execute(sa.select(deliveries).where(
                deliveries.c.event_id.in_(list(order_of))))).all():
            outcome: ReceiptOutcome = row.outcome
            receipts[order_of[row.event_id]].append(Receipt(
                subscriber=row.subscriber, outcome=outcome, at=row.received_at,
                error=row.error, duration_ms=row.duration_ms, queue=row.queue))
        return {order_id: fan_out(expected[order_id], receipts[order_id],
                                  placed_at=placed.get(order_id), now=now, late_after=late_after)
                for order_id in event_ids}
