"""Sellers: lines grouped per seller, one notification each, the handler, the CLI."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.events import OrderLine, OrderPlaced, SellerNotified
from common.kit.db import create_tables, make_engine
from seller_service.cli import app
from seller_service.domain import SellerLines, group_by_seller
from seller_service.service import notify_sellers, service
from seller_service.store import InboxStore, Notification, metadata
from tests.factories import make_line, make_order

pytestmark = pytest.mark.unit


def line(sku: str, seller: str, quantity: int = 1, price: str = "2.50") -> OrderLine:
    """A line whose seller matters: the seller comes second."""
    return make_line(sku, quantity, price=price, seller=seller)


class FakeInboxStore(InboxStore):
    """The inbox store on an in-memory list."""

    def __init__(self) -> None:
        self.notes: list[Notification] = []

    async def add(self, order_id: uuid.UUID, share: SellerLines, currency: str) -> Notification:
        note = Notification(seller_id=share.seller_id, order_id=order_id, lines=share.lines,
                            total=share.total, currency=currency, created_at=datetime.now(UTC))
        self.notes.append(note)
        return note

    async def inbox(self, seller_id: str, limit: int = 100) -> list[Notification]:
        return [n for n in reversed(self.notes) if n.seller_id == seller_id][:limit]


# --- domain ------------------------------------------------------------------------------


def test_lines_are_grouped_per_seller_in_a_stable_order() -> None:
    """Sellers come in first-appearance order, each with its lines in order, and a total."""
    a1, b1, a2, c1 = (line("A1", "s-a", 2), line("B1", "s-b"), line("A2", "s-a", 1, "10.00"),
                      line("C1", "s-c"))
    groups = group_by_seller([a1, b1, a2, c1])
    assert [(g.seller_id, g.lines) for g in groups] == [
        ("s-a", (a1, a2)), ("s-b", (b1,)), ("s-c", (c1,))]
    assert [g.total for g in groups] == [Decimal("15.00"), Decimal("2.50"), Decimal("2.50")]


def test_one_seller_gets_one_group() -> None:
    """An order from a single seller is a single group with every line."""
    lines = [line("A", "solo"), line("B", "solo")]
    assert group_by_seller(lines) == [SellerLines(seller_id="solo", lines=tuple(lines))]


# --- handler with a fake store ---------------------------------------------------------------


def test_the_seller_service_consumes_order_placed_and_notifies_sellers() -> None:
    """The seller service consumes OrderPlaced, and only that; it says SellerNotified."""
    assert service.consumes == (OrderPlaced,)
    assert service.produced == (SellerNotified,)


async def test_notify_sellers_notifies_each_seller_once_with_its_lines() -> None:
    """Two sellers: two inbox entries and two SellerNotified, each with that seller's lines."""
    store = FakeInboxStore()
    placed = make_order(line("A1", "s-a"), line("B1", "s-b", 3), line("A2", "s-a"))
    events = await notify_sellers(placed, store)
    assert all(isinstance(e, SellerNotified) for e in events)
    notified = [e for e in events if isinstance(e, SellerNotified)]
    assert [(e.seller_id, [ln.sku for ln in e.lines]) for e in notified] == [
        ("s-a", ["A1", "A2"]), ("s-b", ["B1"])]
    for event in notified:
        assert event.order_id == placed.order_id
    assert len({e.event_id for e in notified}) == 2
    assert [(n.seller_id, n.total, n.currency) for n in store.notes] == [
        ("s-a", Decimal("5.00"), "EUR"), ("s-b", Decimal("7.50"), "EUR")]


# --- CLI -----------------------------------------------------------------------------------


def test_cli_shows_a_sellers_inbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`inbox SELLER_ID` prints a table, `--json` the entries, an empty inbox says so."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'seller.db'}"
    monkeypatch.setenv("SELLER_DATABASE_URL", url)
    order_id = uuid.uuid4()

    async def seed() -> None:
        eng = make_engine(url)
        await create_tables(eng, metadata)
        async with eng.begin() as conn:
            await InboxStore(conn).add(
                order_id, SellerLines("s-a", (line("SKU-MUG-1", "s-a", 2),)), "EUR")
        await eng.dispose()

    asyncio.run(seed())
    runner = CliRunner()
    as_json = runner.invoke(app, ["inbox", "s-a", "--json"])
    assert as_json.exit_code == 0, as_json.output
    [entry] = json.loads(as_json.output)
    assert (entry["order_id"], entry["total"], entry["currency"]) == (str(order_id), "5.00", "EUR")
    table = runner.invoke(app, ["inbox", "s-a"])
    assert table.exit_code == 0, table.output
    assert "SKU-MUG-1" in table.output
    empty = runner.invoke(app, ["inbox", "s-z"])
    assert empty.exit_code == 0
    assert "empty" in empty.output


def test_cli_refuses_a_malformed_seller_id(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A seller id that no order could carry is refused with a clear message."""
    monkeypatch.setenv("SELLER_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'seller.db'}")
    result = CliRunner().invoke(app, ["inbox", "no such seller!"])
    assert result.exit_code == 1
    assert "invalid seller id" in result.output
