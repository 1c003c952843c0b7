"""The logistics store on a real database, SQLite and PostgreSQL: shipments, one per order."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import date

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from common.kit.db import create_tables, make_engine
from logistics_service.domain import plan_shipment
from logistics_service.store import ShipmentStore, metadata

pytestmark = pytest.mark.integration

FRIDAY = date(2024, 6, 7)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(db_url)
    await create_tables(eng, metadata)
    yield eng
    await eng.dispose()


async def test_store_adds_gets_and_lists_shipments(engine: AsyncEngine) -> None:
    """A stored shipment reads back equal, by order and in the list."""
    first = plan_shipment(uuid.uuid4(), "DE", FRIDAY)
    second = plan_shipment(uuid.uuid4(), "CA", FRIDAY)
    async with engine.begin() as conn:
        await ShipmentStore(conn).add(first)
        await ShipmentStore(conn).add(second)
    async with engine.connect() as conn:
        store = ShipmentStore(conn)
        assert await store.get(first.order_id) == first
        assert await store.get(uuid.uuid4()) is None
        assert {s.order_id for s in await store.list_shipments()} == {
            first.order_id, second.order_id}


async def test_store_keeps_one_shipment_per_order(engine: AsyncEngine) -> None:
    """A second shipment for the same order is refused by the database."""
    shipment = plan_shipment(uuid.uuid4(), "DE", FRIDAY)
    async with engine.begin() as conn:
        await ShipmentStore(conn).add(shipment)
    with pytest.raises(sa.exc.IntegrityError):
        async with engine.begin() as conn:
            await ShipmentStore(conn).add(shipment)


