"""The seller store on a real database, SQLite and PostgreSQL: each seller's inbox."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from common.events import OrderLine
from common.kit.db import create_tables, make_engine
from seller_service.domain import SellerLines
from seller_service.service import notify_sellers
from seller_service.store import InboxStore, metadata
from tests.factories import make_line, make_order

pytestmark = pytest.mark.integration


def line(sku: str, seller: str, quantity: int = 1, price: str = "2.50") -> OrderLine:
    """A line whose seller matters: the seller comes second."""
    return make_line(sku, quantity, price=price, seller=seller)


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(db_url)
    await create_tables(eng, metadata)
    yield eng
    await eng.dispose()


async def test_inbox_reads_back_a_sellers_notifications(engine: AsyncEngine) -> None:
    """Each seller reads only its own entries, newest first, lines and exact total intact."""
    first, second = uuid.uuid4(), uuid.uuid4()
    share = SellerLines("s-a", (line("A1", "s-a", 3, "0.10"),))
    async with engine.begin() as conn:
        store = InboxStore(conn)
        await store.add(first, share, "EUR")
        await store.add(first, SellerLines("s-b", (line("B1", "s-b"),)), "EUR")
        await store.add(second, share, "EUR")
    async with engine.connect() as conn:
        inbox = await InboxStore(conn).inbox("s-a")
        assert await InboxStore(conn).inbox("nobody") == []
    assert [n.order_id for n in inbox] == [second, first]
    assert inbox[0].lines == share.lines
    assert inbox[0].total == Decimal("0.30")
    assert inbox[0].created_at.tzinfo is not None


async def test_inbox_keeps_one_notification_per_seller_and_order(engine: AsyncEngine) -> None:
    """A second notification of the same seller for the same order is refused."""
    order_id = uuid.uuid4()
    share = SellerLines("s-a", (line("A1", "s-a"),))
    async with engine.begin() as conn:
        await InboxStore(conn).add(order_id, share, "EUR")
    with pytest.raises(sa.exc.IntegrityError):
        async with engine.begin() as conn:
            await InboxStore(conn).add(order_id, share, "EUR")


async def test_handler_on_the_real_store(engine: AsyncEngine) -> None:
    """notify_sellers on a real database fills each seller's inbox."""
    placed = make_order(line("A1", "s-a"), line("B1", "s-b"))
    async with engine.begin() as conn:
        await notify_sellers(placed, InboxStore(conn))
    async with engine.connect() as conn:
        for seller in ("s-a", "s-b"):
            [note] = await InboxStore(conn).inbox(seller)
            assert note.order_id == placed.order_id


