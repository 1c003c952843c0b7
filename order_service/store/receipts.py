"""Delivery receipts: what each subscriber did with each delivery, kept once each."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import DeliveryReceipt
from order_service.domain.order import OrderState
from order_service.store.tables import deliveries, orders

#: What a receipt for the same (event, subscriber, outcome) as a stored one refreshes.
_DELIVERY_REFRESHED = ("receipt_id", "error", "received_at", "duration_ms")


def _delivery_upsert(insert: Any) -> sa.Executable:
    stmt = insert(deliveries)
    upsert: sa.Executable = stmt.on_conflict_do_update(
        index_elements=["event_id", "subscriber", "outcome"],
        set_={name: stmt.excluded[name] for name in _DELIVERY_REFRESHED})
    return upsert


#: The receipts' INSERT ... ON CONFLICT DO UPDATE, built once: executed with many rows.
_DELIVERY_UPSERTS = {"sqlite": _delivery_upsert(sqlite.insert),
                     "postgresql": _delivery_upsert(postgresql.insert)}
_KNOWN_ORDERS = sa.select(orders.c.order_id).where(
    orders.c.order_id.in_(sa.bindparam("b_ids", expanding=True)))
_MARK_PUBLISHED = (orders.update()
                   .where(orders.c.event_id.in_(sa.bindparam("b_event_ids", expanding=True)),
                          orders.c.state == OrderState.ACCEPTED.value)
                   .values(state=OrderState.PLACED.value))
#: Orders settled (answered), open again for the late-orders scan.
_REOPEN_REPLAYED = (orders.update()
                    .where(orders.c.event_id.in_(sa.bindparam("b_event_ids", expanding=True)),
                           orders.c.settled_at.isnot(None))
                    .values(settled_at=None))


class Receipts:
    """The receipts' part of the order store."""

    conn: AsyncConnection

    async def record_delivery(self, receipt: DeliveryReceipt) -> None:
        """Keep a delivery receipt; the same (event, subscriber, outcome) is kept once."""
        await self.record_deliveries([receipt])

    async def record_deliveries(self, receipts: Sequence[DeliveryReceipt]) -> None:
        """Keep receipts (a batch's): a few statements however many there are.

        The same (event, subscriber, outcome) again (a replayed delivery failing once more,
        a redelivered receipt) is one row, with the latest error and timing. A receipt for
        an order's OrderPlaced proves the order was published.
        """
        if not receipts:
            return
        known = await self._known_orders({r.correlation_id for r in receipts})
        rows = [{
            "receipt_id": str(r.event_id),
            "order_id": r.correlation_id if r.correlation_id in known else None,
            "correlation_id": r.correlation_id,
            "event_id": r.handled_event_id,
            "event_type": r.handled_event_type,
            "subscriber": r.subscriber,
            "queue": r.queue,
            "outcome": r.outcome,
            "error": r.error,
            "received_at": r.received_at,
            "duration_ms": r.duration_ms,
        } for r in receipts]
        # Unreadable bodies: no event id to group on (NULLs never conflict); keep each
        # receipt once, by its own id.
        unkeyed = [row for row in rows if row["event_id"] is None]
        if unkeyed:
            stored = set((await self.conn.execute(sa.select(deliveries.c.receipt_id).where(
                deliveries.c.receipt_id.in_([row["receipt_id"] for row in unkeyed])))).scalars())
            fresh = [row for row in unkeyed if row["receipt_id"] not in stored]
            if fresh:
                await self.conn.execute(deliveries.insert(), fresh)
        keyed = {(row["event_id"], row["subscriber"], row["outcome"]): row
                 for row in rows if row["event_id"] is not None}
        upsert = _DELIVERY_UPSERTS.get(self.conn.dialect.name)
        if keyed and upsert is not None:
            await self.conn.execute(upsert, list(keyed.values()))
        else:
            for row in keyed.values():
                await self.conn.execute(await self._portable_delivery_upsert(row))
        published = [r.handled_event_id for r in receipts
                     if r.handled_event_type == "OrderPlaced" and r.correlation_id in known]
        if published:
            await self.conn.execute(_MARK_PUBLISHED, {"b_event_ids": published})
        # A replayed delivery reopens its order for the late-orders scan until it is
        # answered again (rare: an operator's replay).
        reopened = [r.handled_event_id for r in receipts if r.outcome == "replayed"]
        if reopened:
            await self.conn.execute(_REOPEN_REPLAYED, {"b_event_ids": reopened})

    async def _portable_delivery_upsert(self, values: Mapping[str, Any]) -> sa.Executable:
        match = sa.and_(deliveries.c.event_id == values["event_id"],
                        deliveries.c.subscriber == values["subscriber"],
                        deliveries.c.outcome == values["outcome"])
        found = (await self.conn.execute(sa.select(deliveries.c.id).where(match))).first()
        if found is None:
            return deliveries.insert().values(**values)
        return deliveries.update().where(match).values(
            **{k: values[k] for k in _DELIVERY_REFRESHED})

    async def _known_orders(self, correlation_ids: set[str | None]) -> set[str]:
        """Those of `correlation_ids` that name one of our orders."""
        candidates = []
        for correlation_id in correlation_ids:
            if correlation_id is None:
                continue
            try:
                candidates.append(str(uuid.UUID(correlation_id)))
            except ValueError:
                continue
        if not candidates:
            return set()
        rows = await self.conn.execute(_KNOWN_ORDERS, {"b_ids": candidates})
        return set(rows.scalars())
