"""The order service's tables: orders, the subscriber registry, receipts, outcomes."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from common.kit.db import UTCDateTime

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
