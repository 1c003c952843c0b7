"""The subscriber registry the announcements build: who consumes what, since when."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import SubscriberAnnounced
from order_service.domain.views import Subscriber
from order_service.store.tables import orders, subscribers

_REGISTRY = sa.select(subscribers).order_by(subscribers.c.name)
#: Orders placed since a time, settled or not, open again for the late-orders scan.
_REOPEN_SINCE = (orders.update()
                 .where(orders.c.placed_at >= sa.bindparam("b_since"),
                        orders.c.settled_at.isnot(None))
                 .values(settled_at=None))


class Registry:
    """The registry's part of the order store."""

    conn: AsyncConnection

    async def upsert_subscriber(self, event: SubscriberAnnounced) -> None:
        """Register or refresh a subscriber; `first_seen` never moves once set.

        A new subscriber of OrderPlaced (or one that starts consuming it) is expected by
        the orders placed since it was first seen, which the tracker may have settled
        before it read the announcement: those are reopened for the late-orders scan.
        """
        if "OrderPlaced" in event.consumes:
            known = await self.subscriber(event.subscriber)
            if known is None or "OrderPlaced" not in known.consumes:
                since = known.first_seen if known is not None else event.occurred_at
                await self.conn.execute(_REOPEN_SINCE, {"b_since": since})
        values = {"name": event.subscriber, "consumes": json.dumps(event.consumes, sort_keys=True),
                  "instance": event.instance, "first_seen": event.occurred_at,
                  "last_seen": event.occurred_at}
        update = {"consumes": values["consumes"], "instance": event.instance,
                  "last_seen": event.occurred_at}
        stmt = _upsert(self.conn, subscribers, values, ["name"], update)
        if stmt is not None:
            await self.conn.execute(stmt)
            return
        found = (await self.conn.execute(sa.select(subscribers.c.name).where(
            subscribers.c.name == event.subscriber))).first()
        if found is None:
            await self.conn.execute(subscribers.insert().values(**values))
        else:
            await self.conn.execute(subscribers.update()
                                    .where(subscribers.c.name == event.subscriber)
                                    .values(**update))

    async def list_subscribers(self) -> list[Subscriber]:
        """The registry, by name."""
        return [_subscriber(r) for r in (await self.conn.execute(_REGISTRY)).all()]

    async def subscriber(self, name: str) -> Subscriber | None:
        """One registry entry, or None."""
        row = (await self.conn.execute(
            sa.select(subscribers).where(subscribers.c.name == name))).first()
        return _subscriber(row) if row is not None else None

    async def retire_subscriber(self, name: str) -> None:
        """Take `name` out of the registry: orders placed from now on do not expect it;
        those placed before keep whom they expected."""
        await self.conn.execute(subscribers.delete().where(subscribers.c.name == name))

    async def subscribers_of(self, event_type: str, *, seen_by: datetime) -> list[str]:
        """Names of the registered subscribers of `event_type` first seen by `seen_by`."""
        return [s.name for s in await self.list_subscribers()
                if event_type in s.consumes and s.first_seen <= seen_by]


def _subscriber(row: Any) -> Subscriber:
    return Subscriber(name=row.name, consumes=json.loads(row.consumes), instance=row.instance,
                      first_seen=row.first_seen, last_seen=row.last_seen)


def _upsert(conn: AsyncConnection, table: sa.Table, values: Mapping[str, Any],
            keys: Sequence[str], update: Mapping[str, Any]) -> sa.Executable | None:
    """An INSERT ... ON CONFLICT DO UPDATE for the dialects that have it, else None."""
    name = conn.dialect.name
    if name == "sqlite":
        stmt = sqlite.insert(table).values(**values)
        return stmt.on_conflict_do_update(index_elements=list(keys), set_=dict(update))
    if name == "postgresql":
        pg = postgresql.insert(table).values(**values)
        return pg.on_conflict_do_update(index_elements=list(keys), set_=dict(update))
    return None
