"""Logistics' own table: the shipments it scheduled."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from common.kit.db import UTCDateTime
from logistics_service.domain import Shipment

metadata = sa.MetaData()

shipments = sa.Table(
    "shipments",
    metadata,
    sa.Column("shipment_id", sa.Uuid, primary_key=True),
    # One shipment per order: a second insert for the same order is a bug, refused here.
    sa.Column("order_id", sa.Uuid, nullable=False, unique=True),
    sa.Column("carrier", sa.String(64), nullable=False),
    sa.Column("tracking_number", sa.String(64), nullable=False),
    sa.Column("destination_country", sa.String(2), nullable=False),
    sa.Column("estimated_delivery", sa.Date, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)


def _shipment(row: sa.Row[tuple[object, ...]]) -> Shipment:
    return Shipment(
        shipment_id=row.shipment_id,
        order_id=row.order_id,
        carrier=row.carrier,
        tracking_number=row.tracking_number,
        destination_country=row.destination_country,
        estimated_delivery=row.estimated_delivery,
    )


class ShipmentStore:
    """Shipments, on the connection (and transaction) it is given."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, shipment: Shipment) -> None:
        """Store a scheduled shipment."""
        # Parameters apart from the statement: SQLAlchemy then reuses its compiled form.
        await self._conn.execute(shipments.insert(), {
            "shipment_id": shipment.shipment_id,
            "order_id": shipment.order_id,
            "carrier": shipment.carrier,
            "tracking_number": shipment.tracking_number,
            "destination_country": shipment.destination_country,
            "estimated_delivery": shipment.estimated_delivery,
            "created_at": datetime.now(UTC),
        })

    async def get(self, order_id: uuid.UUID) -> Shipment | None:
        """The shipment of an order, or None."""
        row = (await self._conn.execute(
            sa.select(shipments).where(shipments.c.order_id == order_id))).first()
        return _shipment(row) if row is not None else None

    async def list_shipments(self, limit: int = 100) -> list[Shipment]:
        """The most recent shipments first."""
        rows = await self._conn.execute(
            sa.select(shipments).order_by(shipments.c.created_at.desc()).limit(limit))
        return [_shipment(row) for row in rows]
