"""Inventory: the all-or-nothing rule, the handler on a fake store, the CLI."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.events import (
    OrderPlaced,
    ReservedLine,
    StockReservationFailed,
    StockReserved,
)
from inventory_service.cli import app
from inventory_service.domain import plan_reservation
from inventory_service.service import reserve_stock, service
from inventory_service.store import StockStore
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


def test_inventory_consumes_order_placed_and_reports_the_reservation() -> None:
    """Inventory consumes OrderPlaced, and only that; it says StockReserved or
    StockReservationFailed."""
    assert service.consumes == (OrderPlaced,)
    assert set(service.produced) == {StockReserved, StockReservationFailed}


async def test_reserve_stock_publishes_stock_reserved_in_the_order_flow() -> None:
    """Enough stock: units are taken, StockReserved names the lines (the kit puts it in the
    order's flow: tests/integration/test_order_flow.py)."""
    store = FakeStockStore({"A": 5, "B": 1})
    placed = make_order(make_line("A", 2), make_line("B", 1), make_line("A", 1))
    event = await reserve_stock(placed, store)
    assert isinstance(event, StockReserved)
    assert event.order_id == placed.order_id
    assert event.lines == (ReservedLine(sku="A", quantity=3), ReservedLine(sku="B", quantity=1))
    assert store.available == {"A": 2, "B": 0}
    assert store.held == {placed.order_id: {"A": 3, "B": 1}}


async def test_reserve_stock_reserves_nothing_when_a_line_fails() -> None:
    """One line short: StockReservationFailed with the reason, and no stock is touched."""
    store = FakeStockStore({"A": 5, "B": 1})
    placed = make_order(make_line("A", 2), make_line("B", 2), make_line("NOPE", 1))
    event = await reserve_stock(placed, store)
    assert isinstance(event, StockReservationFailed)
    assert [(f.sku, f.reason) for f in event.lines] == [
        ("B", "insufficient_stock"), ("NOPE", "unknown_sku")]
    assert "not enough stock for B" in event.reason
    assert "unknown SKU NOPE" in event.reason
    assert store.available == {"A": 5, "B": 1}
    assert store.held == {}


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
