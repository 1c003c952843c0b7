"""The order service's own tables: orders, the subscriber registry, receipts, outcomes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.events import DeliveryReceipt, OrderPlaced, SubscriberAnnounced
from common.kit.db import UTCDateTime
from common.kit.outbox import outbox
from order_service.domain import (
    FanOut,
    OrderState,
    OrderStatus,
    OrderSummary,
    OrderTrace,
    OrderView,
    Outcome,
    Receipt,
    ReceiptOutcome,
    Subscriber,
    SubscriberLight,
    TracedOutcome,
    TracedReceipt,
    advance,
    fan_out,
    trace,
)

metadata = sa.MetaData()

orders = sa.Table(
    "orders", metadata,
    sa.Column("order_id", sa.String(36), primary_key=True),
    sa.Column("customer_id", sa.String(64), nullable=False, index=True),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("total", sa.Numeric(14, 2), nullable=False),
    sa.Column("placed_at", UTCDateTime(), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False),
    # The whole OrderPlaced as published: the order's lines and address are read from it.
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("event_id", sa.String(36), nullable=False, unique=True),
    # The client's Idempotency-Key, when it sent one (added later: nullable, and
    # `upgrade_schema` adds it, with its index, to an older database).
    sa.Column("idempotency_key", sa.String(128), nullable=True),
    # When a late-orders scan found every expected subscriber's final answer: from then on
    # the scan skips the order (added later, like idempotency_key). Cleared again when the
    # answer is reopened (a replayed dead letter, a subscriber registered late).
    sa.Column("settled_at", UTCDateTime(), nullable=True),
)

#: One order per customer and Idempotency-Key; orders placed without a key are not indexed.
_IDEMPOTENCY_INDEX = sa.Index(
    "uq_orders_idempotency", orders.c.customer_id, orders.c.idempotency_key, unique=True,
    sqlite_where=orders.c.idempotency_key.isnot(None),
    postgresql_where=orders.c.idempotency_key.isnot(None))

#: The orders a late-orders scan still has to look at: the few not yet settled, by time. Its
#: WHERE must match the scans' own `settled_at IS NULL` for the database to use it.
_UNSETTLED_INDEX = sa.Index(
    "ix_orders_unsettled", orders.c.placed_at,
    sqlite_where=orders.c.settled_at.is_(None), postgresql_where=orders.c.settled_at.is_(None))

#: The registry: who consumes what, built from the subscribers' announcements.
subscribers = sa.Table(
    "subscribers", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("consumes", sa.Text, nullable=False),
    # host:pid; a host name alone may take 253 characters.
    sa.Column("instance", sa.Text, nullable=False),
    sa.Column("first_seen", UTCDateTime(), nullable=False),
    sa.Column("last_seen", UTCDateTime(), nullable=False),
)

#: Who was expected to handle an order's OrderPlaced, frozen when it was placed, so a
#: subscriber added later does not make old orders look incomplete.
order_expectations = sa.Table(
    "order_expectations", metadata,
    sa.Column("order_id", sa.String(36), primary_key=True),
    sa.Column("subscriber", sa.String(64), primary_key=True),
)

#: Delivery receipts: what each subscriber did with each delivery.
deliveries = sa.Table(
    "deliveries", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # The receipt's own event_id: the audit queue is not deduped by the kit, so a
    # redelivered receipt is recognised here.
    sa.Column("receipt_id", sa.String(36), nullable=False, unique=True),
    sa.Column("order_id", sa.String(36), nullable=True, index=True),
    sa.Column("correlation_id", sa.String(128), nullable=True),
    # The handled delivery's message id and type as they came: for an unreadable message,
    # whatever a publisher set, up to AMQP's 255 (PostgreSQL enforces lengths; SQLite not).
    # Looked up through the unique (event_id, subscriber, outcome) below, whose index
    # starts with it; an index of its own only cost every insert (dropped at start-up).
    sa.Column("event_id", sa.String(255), nullable=True),
    sa.Column("event_type", sa.String(255), nullable=True),
    sa.Column("subscriber", sa.String(64), nullable=False),
    sa.Column("queue", sa.String(255), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.UniqueConstraint("event_id", "subscriber", "outcome",
                        name="uq_deliveries_event_subscriber_outcome"),
)

#: Domain outcomes the other services reported (stock, shipment, sellers).
outcomes = sa.Table(
    "outcomes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.String(36), nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("event_id", sa.String(36), nullable=False),
    # The service that produced the outcome event, for the order's trace (added later:
    # nullable, and `upgrade_schema` adds it to an older database).
    sa.Column("producer", sa.String(64), nullable=True),
)

#: Receipts that are a subscriber's final word on a delivery, short of an operator's replay.
_FINAL_OUTCOMES = ("handled", "duplicate", "dead_lettered")
#: Orders examined per query when looking for late ones.
_LATE_BATCH = 500
#: Orders whose fan-out a listing works out between two turns of the event loop: SQLite
#: runs inline on the loop, so a page read in one go would hold everything else up for
#: as long as the whole page takes (about 3 ms per slice of 50).
_SLICE = 50
#: Unsettled orders one `settle_answered` transaction looks at.
_SETTLE_CHUNK = 1000


#: Indexes older versions created that the tables no longer declare.
_RETIRED_INDEXES = ("ix_deliveries_event_id",)


async def upgrade_schema(engine: AsyncEngine) -> None:
    """Bring an order database created by older code up to date: add the columns (and
    their indexes) newer code expects, drop the indexes it no longer has.

    Only nullable columns are ever added here, so old rows stay valid. Idempotent, and safe
    when replicas start together (a column another replica just added is not an error).
    """
    added = [outcomes.c.producer, orders.c.idempotency_key, orders.c.settled_at]

    def columns(sync: sa.Connection, table: str) -> set[str]:
        return {c["name"] for c in sa.inspect(sync).get_columns(table)}

    def create_indexes(sync: sa.Connection) -> None:
        _IDEMPOTENCY_INDEX.create(sync, checkfirst=True)
        _UNSETTLED_INDEX.create(sync, checkfirst=True)

    async with engine.begin() as conn:
        for column in added:
            table = column.table.name
            if column.name in await conn.run_sync(columns, table):
                continue
            exists = " IF NOT EXISTS" if conn.dialect.name == "postgresql" else ""
            kind = column.type.compile(dialect=conn.dialect)
            await conn.execute(sa.text(
                f"ALTER TABLE {table} ADD COLUMN{exists} {column.name} {kind}"))
        await conn.run_sync(create_indexes)
        for index in _RETIRED_INDEXES:
            await conn.execute(sa.text(f"DROP INDEX IF EXISTS {index}"))


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


#: What a receipt for the same (event, subscriber, outcome) as a stored one refreshes.
_DELIVERY_REFRESHED = ("receipt_id", "error", "received_at", "duration_ms")


def _delivery_upsert(insert: Any) -> sa.Executable:
    stmt = insert(deliveries)
    upsert: sa.Executable = stmt.on_conflict_do_update(
        index_elements=["event_id", "subscriber", "outcome"],
        set_={name: stmt.excluded[name] for name in _DELIVERY_REFRESHED})
    return upsert


_REGISTRY = sa.select(subscribers).order_by(subscribers.c.name)

#: The receipts' INSERT ... ON CONFLICT DO UPDATE, built once: executed with many rows.
_DELIVERY_UPSERTS = {"sqlite": _delivery_upsert(sqlite.insert),
                     "postgresql": _delivery_upsert(postgresql.insert)}

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
_KNOWN_ORDERS = sa.select(orders.c.order_id).where(
    orders.c.order_id.in_(sa.bindparam("b_ids", expanding=True)))
_MARK_PUBLISHED = (orders.update()
                   .where(orders.c.event_id.in_(sa.bindparam("b_event_ids", expanding=True)),
                          orders.c.state == OrderState.ACCEPTED.value)
                   .values(state=OrderState.PLACED.value))

_REOPEN_REPLAYED = (orders.update()
                    .where(orders.c.event_id.in_(sa.bindparam("b_event_ids", expanding=True)),
                           orders.c.settled_at.isnot(None))
                    .values(settled_at=None))
_REOPEN_SINCE = (orders.update()
                 .where(orders.c.placed_at >= sa.bindparam("b_since"),
                        orders.c.settled_at.isnot(None))
                 .values(settled_at=None))


@dataclass(frozen=True)
class Position:
    """Where a page of the order list ended: its last order. Lists run newest first, by
    placement time, ties by order id (`_LISTED`), so the next page starts just past it."""

    placed_at: datetime
    order_id: uuid.UUID

    @classmethod
    def of(cls, summary: OrderSummary) -> Position:
        return cls(summary.placed_at, summary.order_id)


#: The order of every list: newest first; the order id breaks ties.
_LISTED = (orders.c.placed_at.desc(), orders.c.order_id)


def _past(position: Position | None) -> list[sa.ColumnElement[bool]]:
    """The orders listed after `position` (keyset paging: the placement index leads
    straight there, however deep the page)."""
    if position is None:
        return []
    placed_at, order_id = position.placed_at, str(position.order_id)
    # The first condition alone is what the index can search on; the second trims the
    # orders placed at that very time which the previous page already listed.
    return [orders.c.placed_at <= placed_at,
            sa.or_(orders.c.placed_at < placed_at, orders.c.order_id > order_id)]


def _subscriber(row: Any) -> Subscriber:
    return Subscriber(name=row.name, consumes=json.loads(row.consumes), instance=row.instance,
                      first_seen=row.first_seen, last_seen=row.last_seen)


class OrderStore:
    """The order service's data, on one connection (the caller owns the transaction)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    # --- orders ---------------------------------------------------------------------

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

    # --- registry -------------------------------------------------------------------

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

    # --- receipts -------------------------------------------------------------------

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

    # --- reads ----------------------------------------------------------------------

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
            sa.select(*_SUMMARY_COLUMNS).where(*_past(after)).order_by(*_LISTED)
            .limit(limit))).all()
        return await self._summaries(rows, now=now, late_after=late_after)

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
            sa.select(*_SUMMARY_COLUMNS)
            .where(orders.c.settled_at.is_(None), orders.c.placed_at <= now - late_after,
                   *_past(after), await self._unanswered())
            .order_by(*_LISTED))).all())
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


_SUMMARY_COLUMNS = (orders.c.order_id, orders.c.customer_id, orders.c.currency, orders.c.total,
                    orders.c.placed_at, orders.c.state, orders.c.event_id)
