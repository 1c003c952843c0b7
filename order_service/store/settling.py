"""Settling: orders every expected subscriber has finally answered are marked, so that
finding the late ones looks only at the few not settled."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from order_service.domain.views import OrderSummary
from order_service.store.status import LISTED, SUMMARY_COLUMNS, Position, Status, past
from order_service.store.tables import deliveries, order_expectations, orders

#: Receipts that are a subscriber's final word on a delivery, short of an operator's replay.
_FINAL_OUTCOMES = ("handled", "duplicate", "dead_lettered")
#: Orders examined per query when looking for late ones.
_LATE_BATCH = 500
#: Unsettled orders one `settle_answered` transaction looks at.
_SETTLE_CHUNK = 1000


class Settling(Status):
    """The late orders' part of the order store."""

    async def late_orders(self, now: datetime, late_after: timedelta, *,
                          limit: int | None = None, after: Position | None = None
                          ) -> list[OrderSummary]:
        """Orders with an expected subscriber late, newest first (`limit`: at most that many;
        `after`: those listed after it).

        The database narrows the search to orders placed before the deadline, not settled
        (see `settle_answered`), that some expected subscriber has not finally answered (no
        handled, duplicate or dead-lettered receipt, or one replayed since); the fan-out
        rule decides on those few.
        """
        candidates = list((await self.conn.execute(
            sa.select(*SUMMARY_COLUMNS)
            .where(orders.c.settled_at.is_(None), orders.c.placed_at <= now - late_after,
                   *past(after), await self._unanswered())
            .order_by(*LISTED))).all())
        found: list[OrderSummary] = []
        for start in range(0, len(candidates), _LATE_BATCH):
            rows = candidates[start:start + _LATE_BATCH]
            found += [o for o in await self._summaries(rows, now=now, late_after=late_after)
                      if o.late]
            if limit is not None and len(found) >= limit:
                return found[:limit]
        return found

    async def settle_answered(self, now: datetime, cutoff: datetime, *,
                              after: datetime | None = None, chunk: int = _SETTLE_CHUNK
                              ) -> datetime | None:
        """Mark settled the orders placed after `after` and by `cutoff` that every expected
        subscriber has finally answered, looking at about `chunk` unsettled orders (the
        oldest); returns where the next chunk starts, or None when this one reached `cutoff`.

        The late-orders scan then looks only at orders not settled: those placed since the
        last scan and those still unanswered, instead of the whole history. Run chunk after
        chunk, each in a transaction of its own, so the first scan of a long history holds
        neither the write lock nor the event loop for long. A settled order is reopened
        when its answer is (`record_deliveries`: a replayed dead letter;
        `upsert_subscriber`: a subscriber registered after orders that expect it).
        """
        window = [orders.c.settled_at.is_(None), orders.c.placed_at <= cutoff]
        if after is not None:
            window.append(orders.c.placed_at > after)
        bound: datetime | None = (await self.conn.execute(
            sa.select(orders.c.placed_at).where(*window).order_by(orders.c.placed_at)
            .offset(chunk - 1).limit(1))).scalar()
        await self.conn.execute(
            orders.update()
            .where(*window, orders.c.placed_at <= (bound or cutoff), ~await self._unanswered())
            .values(settled_at=now))
        return bound if bound is not None and bound < cutoff else None

    async def _unanswered(self) -> sa.ColumnElement[bool]:
        """An order (the enclosing query's `orders` row) some expected subscriber has not
        finally answered."""

        def unanswered_by(subscriber: Any) -> sa.ColumnElement[bool]:
            # correlate_except: `orders` (and `order_expectations`) come from the enclosing
            # queries, even from two levels up; only `deliveries` is this subquery's own.
            final = sa.select(deliveries.c.id).where(
                deliveries.c.event_id == orders.c.event_id,
                deliveries.c.subscriber == subscriber,
                deliveries.c.outcome.in_(_FINAL_OUTCOMES)).correlate_except(deliveries).exists()
            replayed = sa.select(deliveries.c.id).where(
                deliveries.c.event_id == orders.c.event_id,
                deliveries.c.subscriber == subscriber,
                deliveries.c.outcome == "replayed").correlate_except(deliveries).exists()
            return sa.or_(~final, replayed)

        frozen = sa.select(order_expectations.c.subscriber).where(
            order_expectations.c.order_id == orders.c.order_id,
            unanswered_by(order_expectations.c.subscriber)
        ).correlate_except(order_expectations).exists()
        # The registry's subscribers count for orders placed after they started (as in
        # _fan_outs); there are a handful, so one condition each.
        registry = [sa.and_(orders.c.placed_at >= s.first_seen, unanswered_by(s.name))
                    for s in await self.list_subscribers() if "OrderPlaced" in s.consumes]
        return sa.or_(frozen, *registry)
