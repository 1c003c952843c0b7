"""The inventory store on a real database, SQLite and PostgreSQL: stock, reservations, seed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from common.events import ReservedLine, StockReservationFailed, StockReserved
from common.kit.db import create_tables, make_engine
from inventory_service.service import reserve_stock
from inventory_service.store import (
    DEMO_CATALOGUE,
    ReservationConflictError,
    StockBelowReservedError,
    StockStore,
    metadata,
    reservations,
    seed_catalogue,
)
from tests.factories import make_line, make_order
from tests.integration.support import wait_for
from tests.storage import backend_pid, someone_waits_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(db_url)
    await create_tables(eng, metadata)
    yield eng
    await eng.dispose()


async def test_store_sets_and_lists_stock(engine: AsyncEngine) -> None:
    """set_stock adds a SKU or recounts it; list_stock shows on hand, reserved, available."""
    async with engine.begin() as conn:
        store = StockStore(conn)
        await store.set_stock("B", 3)
        await store.set_stock("A", 7)
        await store.set_stock("A", 4)
    async with engine.connect() as conn:
        levels = await StockStore(conn).list_stock()
    assert [(lv.sku, lv.on_hand, lv.reserved, lv.available) for lv in levels] == [
        ("A", 4, 0, 4), ("B", 3, 0, 3)]
    assert levels[0].updated_at.tzinfo is not None


async def test_store_levels_are_available_units_of_known_skus(engine: AsyncEngine) -> None:
    """levels() gives on hand minus reserved, and leaves unknown SKUs out."""
    order_id = uuid.uuid4()
    async with engine.begin() as conn:
        store = StockStore(conn)
        await store.set_stock("A", 10)
        await store.reserve(order_id, [ReservedLine(sku="A", quantity=4)])
    async with engine.connect() as conn:
        store = StockStore(conn)
        assert await store.levels(["A", "GHOST"]) == {"A": 6}
        assert await store.levels([]) == {}
        assert await store.reserved_for(order_id) == {"A": 4}


async def test_store_reserve_is_atomic(engine: AsyncEngine) -> None:
    """A line that cannot be reserved raises, and the rollback undoes the lines before it."""
    async with engine.begin() as conn:
        await StockStore(conn).set_stock("A", 5)
        await StockStore(conn).set_stock("B", 1)
    order_id = uuid.uuid4()
    with pytest.raises(ReservationConflictError, match="B"):
        async with engine.begin() as conn:
            await StockStore(conn).reserve(order_id, [ReservedLine(sku="A", quantity=3),
                                                      ReservedLine(sku="B", quantity=2)])
    async with engine.connect() as conn:
        store = StockStore(conn)
        assert await store.levels(["A", "B"]) == {"A": 5, "B": 1}
        assert await store.reserved_for(order_id) == {}


async def test_store_guarded_update_refuses_an_oversell_after_a_stale_read(
        engine: AsyncEngine) -> None:
    """Stock taken by another transaction after our check: our reservation is refused.

    The check here is a plain read, without the row lock levels() takes, so the other
    transaction can get in between. PostgreSQL refuses our write in the guarded UPDATE;
    SQLite already refuses the write of a transaction whose snapshot is stale (database is
    locked). Either way, no oversell.
    """
    async with engine.begin() as conn:
        await StockStore(conn).set_stock("A", 5)
    async with engine.connect() as mine:
        store = StockStore(mine)
        level = await store.get("A")  # our check passes...
        assert level is not None
        assert level.available == 5
        async with engine.begin() as theirs:  # ...then a concurrent order takes 4 units
            await StockStore(theirs).reserve(uuid.uuid4(), [ReservedLine(sku="A", quantity=4)])
        with pytest.raises((ReservationConflictError, OperationalError)):
            await store.reserve(uuid.uuid4(), [ReservedLine(sku="A", quantity=3)])
        await mine.rollback()
    async with engine.connect() as conn:
        [level] = await StockStore(conn).list_stock()
    assert (level.on_hand, level.reserved, level.available) == (5, 4, 1)


async def test_store_refuses_a_recount_below_the_reserved_units(engine: AsyncEngine) -> None:
    """On hand cannot be set under what orders hold; the message says the floor."""
    async with engine.begin() as conn:
        store = StockStore(conn)
        await store.set_stock("A", 5)
        await store.reserve(uuid.uuid4(), [ReservedLine(sku="A", quantity=3)])
    async with engine.begin() as conn:
        with pytest.raises(StockBelowReservedError, match="3 or more"):
            await StockStore(conn).set_stock("A", 2)
        level = await StockStore(conn).set_stock("A", 3)
    assert (level.on_hand, level.reserved, level.available) == (3, 3, 0)


async def test_store_refuses_to_reserve_an_order_twice(engine: AsyncEngine) -> None:
    """The reservations key stops a second reservation of the same order and SKU."""
    order_id = uuid.uuid4()
    async with engine.begin() as conn:
        await StockStore(conn).set_stock("A", 5)
        await StockStore(conn).reserve(order_id, [ReservedLine(sku="A", quantity=1)])
    with pytest.raises(sa.exc.IntegrityError):
        async with engine.begin() as conn:
            await StockStore(conn).reserve(order_id, [ReservedLine(sku="A", quantity=1)])
    async with engine.connect() as conn:
        assert await StockStore(conn).levels(["A"]) == {"A": 4}


async def test_handler_on_the_real_store(engine: AsyncEngine) -> None:
    """reserve_stock on a real database: a success takes the units, a failure none."""
    async with engine.begin() as conn:
        await StockStore(conn).set_stock("A", 3)
        await StockStore(conn).set_stock("B", 1)
    async with engine.begin() as conn:
        ok = await reserve_stock(make_order(make_line("A", 2)), StockStore(conn))
    async with engine.begin() as conn:
        failed = await reserve_stock(make_order(make_line("A", 1), make_line("B", 2)),
                                       StockStore(conn))
    assert isinstance(ok, StockReserved)
    assert isinstance(failed, StockReservationFailed)
    async with engine.connect() as conn:
        assert await StockStore(conn).levels(["A", "B"]) == {"A": 1, "B": 1}
        rows = (await conn.execute(sa.select(sa.func.count()).select_from(reservations)))
        assert rows.scalar_one() == 1


async def test_a_multi_line_order_is_reserved_line_by_line(engine: AsyncEngine) -> None:
    """Every line of a successful multi-line order is reserved: each SKU's reserved units,
    the order's reservation rows and the event name each line; other SKUs are untouched."""
    async with engine.begin() as conn:
        for sku, units in {"A": 5, "B": 3, "C": 10, "D": 7}.items():
            await StockStore(conn).set_stock(sku, units)
    order = make_order(make_line("C", 1), make_line("A", 2, seller="s1"), make_line("B", 3),
                       make_line("A", 1, seller="s2"))
    async with engine.begin() as conn:
        reserved = await reserve_stock(order, StockStore(conn))
    assert isinstance(reserved, StockReserved)
    assert sorted((ln.sku, ln.quantity) for ln in reserved.lines) == [
        ("A", 3), ("B", 3), ("C", 1)]
    async with engine.connect() as conn:
        store = StockStore(conn)
        assert await store.reserved_for(order.order_id) == {"A": 3, "B": 3, "C": 1}
        levels = {lv.sku: (lv.on_hand, lv.reserved) for lv in await store.list_stock()}
    assert levels == {"A": (5, 3), "B": (3, 3), "C": (10, 1), "D": (7, 0)}


async def test_seed_catalogue_fills_only_an_empty_stock(engine: AsyncEngine) -> None:
    """The demo catalogue goes into an empty table, and never over an operator's stock."""
    await seed_catalogue(engine)
    await seed_catalogue(engine)  # a restart: nothing changes
    async with engine.connect() as conn:
        levels = {lv.sku: lv.on_hand for lv in await StockStore(conn).list_stock()}
    assert levels == DEMO_CATALOGUE
    assert {"SKU-BOOK-1", "SKU-MUG-1"} <= levels.keys()


async def test_seed_catalogue_leaves_an_operators_stock_alone(engine: AsyncEngine) -> None:
    """One SKU set by an operator and the seed does nothing."""
    async with engine.begin() as conn:
        await StockStore(conn).set_stock("MY-SKU", 1)
    await seed_catalogue(engine)
    async with engine.connect() as conn:
        assert [lv.sku for lv in await StockStore(conn).list_stock()] == ["MY-SKU"]


@pytest.fixture
async def pg_engine(postgres_db_url: str) -> AsyncIterator[AsyncEngine]:
    """For what only PostgreSQL has: row locks between concurrent transactions."""
    eng = make_engine(postgres_db_url)
    await create_tables(eng, metadata)
    yield eng
    await eng.dispose()


async def test_levels_locks_the_rows_so_a_concurrent_order_waits_its_turn(
        pg_engine: AsyncEngine) -> None:
    """PostgreSQL: levels() locks the SKU rows; a second order on them waits, then sees the
    units the first one took and is refused by the guard, never overselling.

    SQLite has no row locks (a writer locks the whole file), which the stale-read test
    above covers.
    """
    engine = pg_engine
    async with engine.begin() as conn:
        await StockStore(conn).set_stock("A", 5)

    async def other_order() -> None:
        async with engine.begin() as theirs:
            await StockStore(theirs).reserve(uuid.uuid4(), [ReservedLine(sku="A", quantity=4)])

    async with engine.connect() as mine:
        assert await StockStore(mine).levels(["A"]) == {"A": 5}  # rows locked from here
        pid = await backend_pid(mine)
        waiting = asyncio.create_task(other_order())
        await wait_for(lambda: someone_waits_for(engine, pid),
                       what="the other order to wait for our row lock")
        assert not waiting.done()
        await StockStore(mine).reserve(uuid.uuid4(), [ReservedLine(sku="A", quantity=3)])
        await mine.commit()
    with pytest.raises(ReservationConflictError):
        await waiting
    async with engine.connect() as conn:
        level = await StockStore(conn).get("A")
    assert level is not None
    assert (level.on_hand, level.reserved) == (5, 3)
