"""The orders themselves: placed, found again by id or Idempotency-Key, moved on, told of
their outcomes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from common.events import OrderPlaced
from common.kit.db import UTCDateTime
from order_service.domain.order import OrderState, advance
from order_service.store.registry import Registry
from order_service.store.tables import order_expectations, orders, outcomes

# The statements of the per-order path, built once with bound parameters: building them
# per call (coercing each clause, generating its cache key) cost the order service more
# than SQLite took to run them.
_INSERT_ORDER = orders.insert()
_INSERT_EXPECTATIONS = order_expectations.insert()
#: An outcome only for an order we have: one statement, whose row count says whether it was.
_INSERT_OUTCOME = outcomes.insert().from_select(
    ["order_id", "kind", "detail", "at", "event_id", "producer"],
    sa.select(orders.c.order_id, sa.bindparam("kind", type_=sa.String),
              sa.bindparam("detail", type_=sa.Text), sa.bindparam("at", type_=UTCDateTime()),
              sa.bindparam("event_id", type_=sa.String),
              sa.bindparam("producer", type_=sa.String))
    .where(orders.c.order_id == sa.bindparam("order_id")))
_ADVANCE = (orders.update()
            .where(orders.c.order_id == sa.bindparam("b_order_id"),
                   orders.c.state.in_(sa.bindparam("b_weaker", expanding=True)))
            .values(state=sa.bindparam("b_state")))
#: Per state: the states an order in it may move forward from.
_WEAKER = {seen: [state.value for state in OrderState if advance(state, seen) != state]
           for seen in OrderState}


class Orders(Registry):
    """The orders' part of the order store (an order expects the registry's subscribers)."""

    async def add_order(self, event: OrderPlaced, idempotency_key: str | None = None
                        ) -> list[str]:
        """Store a new order (accepted) with the subscribers expected to handle it.

        Returns the expected subscribers' names. A second order of the same customer with
        the same `idempotency_key` breaks the unique index (IntegrityError).
        """
        placed_at = event.occurred_at.astimezone(UTC)
        await self.conn.execute(_INSERT_ORDER, {
            "order_id": str(event.order_id),
            "customer_id": event.customer_id,
            "currency": event.currency,
            "total": event.total,
            "placed_at": placed_at,
            "state": OrderState.ACCEPTED.value,
            "body": event.model_dump_json(),
            "event_id": str(event.event_id),
            "idempotency_key": idempotency_key,
        })
        expected = await self.subscribers_of("OrderPlaced", seen_by=placed_at)
        if expected:
            await self.conn.execute(_INSERT_EXPECTATIONS, [
                {"order_id": str(event.order_id), "subscriber": name} for name in expected
            ])
        return expected

    async def get_order(self, order_id: uuid.UUID) -> tuple[OrderPlaced, OrderState] | None:
        """The order's OrderPlaced and its state, or None when unknown."""
        row = (await self.conn.execute(
            sa.select(orders.c.body, orders.c.state)
            .where(orders.c.order_id == str(order_id)))).first()
        if row is None:
            return None
        return OrderPlaced.model_validate_json(row.body), OrderState(row.state)

    async def order_for_key(self, customer_id: str, idempotency_key: str
                            ) -> tuple[OrderPlaced, OrderState] | None:
        """The order this customer placed with this Idempotency-Key, if any."""
        row = (await self.conn.execute(
            sa.select(orders.c.body, orders.c.state)
            .where(orders.c.customer_id == customer_id,
                   orders.c.idempotency_key == idempotency_key))).first()
        if row is None:
            return None
        return OrderPlaced.model_validate_json(row.body), OrderState(row.state)

    async def advance_state(self, order_id: uuid.UUID | str, seen: OrderState) -> None:
        """Move the order forward to `seen` if that is progress (unknown orders: no-op)."""
        await self.conn.execute(_ADVANCE, {"b_order_id": str(order_id),
                                           "b_weaker": _WEAKER[seen], "b_state": seen.value})

    async def record_outcome(self, order_id: uuid.UUID, kind: str, detail: Mapping[str, Any],
                             at: datetime, event_id: uuid.UUID,
                             producer: str | None = None) -> bool:
        """Keep a domain outcome another service reported (and which service it was);
        False, keeping nothing, when there is no such order."""
        result = await self.conn.execute(_INSERT_OUTCOME, {
            "order_id": str(order_id), "kind": kind, "detail": json.dumps(detail, default=str),
            "at": at, "event_id": str(event_id), "producer": producer})
        return bool(result.rowcount)
