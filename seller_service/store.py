"""The seller service's own table: each seller's inbox of order notifications."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import OrderLine
from common.kit.db import UTCDateTime
from seller_service.domain import SellerLines

metadata = sa.MetaData()

notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("seller_id", sa.String(64), nullable=False),
    sa.Column("order_id", sa.Uuid, nullable=False),
    # The seller's lines as JSON: the inbox shows them as they were ordered, and nothing
    # queries inside them.
    sa.Column("lines", sa.Text, nullable=False),
    # Money as its exact decimal text: SQLite has no decimal type and would round-trip
    # through float; the currency sits beside the amount.
    sa.Column("total", sa.String(32), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    # One notification per seller per order: a second one is a bug, refused here.
    sa.UniqueConstraint("seller_id", "order_id", name="notifications_one_per_seller_order"),
    sa.Index("notifications_by_seller", "seller_id", "created_at"),
)

_LINES = TypeAdapter(tuple[OrderLine, ...])


@dataclass(frozen=True)
class Notification:
    """One order, as one seller's inbox shows it."""

    seller_id: str
    order_id: uuid.UUID
    lines: tuple[OrderLine, ...]
    total: Decimal
    currency: str
    created_at: datetime


class InboxStore:
    """Sellers' inboxes, on the connection (and transaction) it is given."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, order_id: uuid.UUID, share: SellerLines, currency: str) -> Notification:
        """Put a seller's share of an order in that seller's inbox."""
        note = Notification(seller_id=share.seller_id, order_id=order_id, lines=share.lines,
                            total=share.total, currency=currency, created_at=datetime.now(UTC))
        # Parameters apart from the statement: SQLAlchemy then reuses its compiled form.
        await self._conn.execute(notifications.insert(), {
            "seller_id": note.seller_id,
            "order_id": note.order_id,
            "lines": _LINES.dump_json(note.lines).decode(),
            "total": str(note.total),
            "currency": note.currency,
            "created_at": note.created_at,
        })
        return note

    async def inbox(self, seller_id: str, limit: int = 100) -> list[Notification]:
        """A seller's notifications, newest first."""
        rows = await self._conn.execute(
            sa.select(notifications)
            .where(notifications.c.seller_id == seller_id)
            .order_by(notifications.c.created_at.desc(), notifications.c.id.desc())
            .limit(limit)
        )
        return [
            Notification(
                seller_id=row.seller_id,
                order_id=row.order_id,
                lines=_LINES.validate_python(json.loads(row.lines)),
                total=Decimal(row.total),
                currency=row.currency,
                created_at=row.created_at,
            )
            for row in rows
        ]
