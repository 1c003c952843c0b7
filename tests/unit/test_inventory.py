"""Inventory: the all-or-nothing rule, the handler, the stock store on SQLite, the CLI."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from common.db import create_tables, make_engine
from common.events import (
    OrderPlaced,
    ReservedLine,
    StockReservationFailed,
    StockReserved,
)
from inventory_service.cli import app
from inventory_service.domain import plan_reservation
from inventory_service.handlers import HANDLERS, reserve_stock
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

pytestmark = pytest.mark.unit


class FakeStockStore(StockStore):
    """The stock store on in-memory dicts: units available and what each order holds."""

    def __init__(self, available: dict[str, int]) -> None:
        self.available = dict(available)
        self.held: dict[uuid.UUID, dict[str, int]] = {}

    async def levels(self, skus: Iterable[str]) -> dict[str, int]:
        return {sku: self.available[sku] for sku in set(skus) if sku in self.available}

    async def reserve(self, order_id: uuid.UUID, lines: Sequence[ReservedLine]) -> None:
        for ln in lines:
            self.available[ln.sku] -= ln.quantity
        self.held[order_id] = {ln.sku: ln.quantity for ln in lines}


# --- domain ------------------------------------------------------------------------------


def test_plan_reserves_every_line_when_all_are_in_stock() -> None:
    """Enough stock for each SKU: every SKU is reserved with the quantity asked for."""
    plan = plan_reservation([make_line("A", 2), make_line("B", 1)], {"A": 2, "B": 5})
    assert plan.ok
    assert plan.reserved == (ReservedLine(sku="A", quantity=2), ReservedLine(sku="B", quantity=1))
    assert plan.unreservable == ()


def test_plan_is_all_or_nothing() -> None:
    """One SKU short: nothing is reserved, and only the short SKU is reported."""
    plan = plan_reservation([make_line("A", 1), make_line("B", 3)], {"A": 10, "B": 2})
    assert not plan.ok
    assert plan.reserved == ()
    [failed] = plan.unreservable
    assert (failed.sku, failed.requested, failed.available, failed.reason) == (
        "B", 3, 2, "insufficient_stock")
    assert "not enough stock for B" in plan.summary


def test_plan_adds_up_lines_of_the_same_sku() -> None:
    """Two lines of one SKU draw on one stock: 3 + 2 against 4 fails, against 5 passes."""
    lines = [make_line("A", 3, seller="s1"), make_line("A", 2, seller="s2")]
    short = plan_reservation(lines, {"A": 4})
    assert [(f.sku, f.requested, f.available) for f in short.unreservable] == [("A", 5, 4)]
    enough = plan_reservation(lines, {"A": 5})
    assert enough.reserved == (ReservedLine(sku="A", quantity=5),)


def test_plan_reports_unknown_skus() -> None:
    """A SKU missing from the stock is unknown_sku, with nothing available."""
    plan = plan_reservation([make_line("A", 1), make_line("GHOST", 2)], {"A": 1})
    [failed] = plan.unreservable
    assert (failed.sku, failed.requested, failed.available, failed.reason) == (
        "GHOST", 2, 0, "unknown_sku")
    assert plan.summary == "unknown SKU GHOST"


def test_plan_reports_every_failing_sku_in_order() -> None:
    """Several failures are all reported, in the order the SKUs appear in the order."""
    plan = plan_reservation([make_line("X", 1), make_line("A", 9), make_line("Y", 1)],
                            {"A": 1, "Y": 0})
    assert [(f.sku, f.reason) for f in plan.unreservable] == [
        ("X", "unknown_sku"), ("A", "insufficient_stock"), ("Y", "insufficient_stock")]


# --- handler with a fake store ---------------------------------------------------------------


def test_handler_table_maps_order_placed_to_reserve_stock() -> None:
    """Inventory consumes OrderPlaced, and only that."""
    assert {OrderPlaced: reserve_stock} == HANDLERS


async def test_reserve_stock_publishes_stock_reserved_in_the_order_flow() -> None:
    """Enough stock: units are taken, StockReserved names the lines, caused by the order."""
    store = FakeStockStore({"A": 5, "B": 1})
    placed = make_order(make_line("A", 2), make_line("B", 1), make_line("A", 1))
    [event] = await reserve_stock(placed, store)
    assert isinstance(event, StockReserved)
    assert event.order_id == placed.order_id
    assert event.lines == (ReservedLine(sku="A", quantity=3), ReservedLine(sku="B", quantity=1))
    assert event.correlation_id == placed.correlation_id
    assert event.causation_id == placed.event_id
    assert event.producer == "inventory"
    assert store.available == {"A": 2, "B": 0}
    assert store.held == {placed.order_id: {"A": 3, "B": 1}}


async def test_reserve_stock_reserves_nothing_when_a_line_fails() -> None:
    """One line short: StockReservationFailed with the reason, and no stock is touched."""
    store = FakeStockStore({"A": 5, "B": 1})
    placed = make_order(make_line("A", 2), make_line("B", 2), make_line("NOPE", 1))
    [event] = await reserve_stock(placed, store)
    assert isinstance(event, StockReservationFailed)
    assert [(f.sku, f.reason) for f in event.lines] == [
        ("B", "insufficient_stock"), ("NOPE", "unknown_sku")]
    assert "not enough stock for B" in event.reason
    assert "unknown SKU NOPE" in event.reason
    assert event.causation_id == placed.event_id
    assert event.correlation_id == placed.correlation_id
    assert store.available == {"A": 5, "B": 1}
    assert store.held == {}


# --- the store on a real SQLite file --------------------------------------------------------


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'inventory.db'}")
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

    PostgreSQL refuses it in the guarded UPDATE; SQLite already refuses the write of a
    transaction whose snapshot is stale (database is locked). Either way, no oversell.
    """
    async with engine.begin() as conn:
        await StockStore(conn).set_stock("A", 5)
    async with engine.connect() as mine:
        store = StockStore(mine)
        assert await store.levels(["A"]) == {"A": 5}  # our check passes...
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
    """reserve_stock against SQLite: a success takes the units, a failure takes none."""
    async with engine.begin() as conn:
        await StockStore(conn).set_stock("A", 3)
        await StockStore(conn).set_stock("B", 1)
    async with engine.begin() as conn:
        [ok] = await reserve_stock(make_order(make_line("A", 2)), StockStore(conn))
    async with engine.begin() as conn:
        [failed] = await reserve_stock(make_order(make_line("A", 1), make_line("B", 2)),
                                       StockStore(conn))
    assert isinstance(ok, StockReserved)
    assert isinstance(failed, StockReservationFailed)
    async with engine.connect() as conn:
        assert await StockStore(conn).levels(["A", "B"]) == {"A": 1, "B": 1}
        rows = (await conn.execute(sa.select(sa.func.count()).select_from(reservations)))
        assert rows.scalar_one() == 1


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


# --- CLI -----------------------------------------------------------------------------------


@pytest.fixture
def cli_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "cli" / "inventory.db"
    monkeypatch.setenv("INVENTORY_DATABASE_URL", f"sqlite+aiosqlite:///{db}")
    return db


def test_cli_sets_and_lists_stock(cli_db: Path) -> None:
    """`stock set` then `stock list --json` shows the SKU with its units."""
    runner = CliRunner()
    result = runner.invoke(app, ["stock", "set", "SKU-PEN-1", "12"])
    assert result.exit_code == 0, result.output
    assert "SKU-PEN-1: 12 on hand" in result.output
    listed = runner.invoke(app, ["stock", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert '"sku": "SKU-PEN-1"' in listed.output
    assert '"available": 12' in listed.output
    table = runner.invoke(app, ["stock", "list"])
    assert table.exit_code == 0
    assert "SKU-PEN-1" in table.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stock", "set", "SKU-PEN-1", "-1"], "greater than or equal to 0"),
        (["stock", "set", "SKU-PEN-1", "many"], "valid integer"),
        (["stock", "set", "bad sku!", "1"], "invalid SKU 'bad sku!'"),
    ],
)
def test_cli_refuses_bad_input_with_a_clear_message(
        cli_db: Path, args: list[str], message: str) -> None:
    """A negative or non-numeric quantity, or a malformed SKU: refused before any write."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())  # Rich wraps long messages
    assert not cli_db.exists()
