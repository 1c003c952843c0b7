"""Logistics: carrier by country, delivery dates over weekends, replay-stable ids, the CLI."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.events import OrderPlaced, ShipmentScheduled
from common.kit.db import create_tables, make_engine
from logistics_service.cli import app
from logistics_service.domain import (
    Shipment,
    add_business_days,
    carrier_for,
    plan_shipment,
    shipment_id,
    tracking_number,
)
from logistics_service.service import schedule_shipment, service
from logistics_service.store import ShipmentStore, metadata
from tests.factories import make_order

pytestmark = pytest.mark.unit

FRIDAY = date(2024, 6, 7)
FRIDAY_MORNING = datetime(2024, 6, 7, 10, 0, tzinfo=UTC)


class FakeShipmentStore(ShipmentStore):
    """The shipment store on an in-memory dict keyed by order id."""

    def __init__(self) -> None:
        self.shipments: dict[uuid.UUID, Shipment] = {}

    async def add(self, shipment: Shipment) -> None:
        self.shipments[shipment.order_id] = shipment

    async def get(self, order_id: uuid.UUID) -> Shipment | None:
        return self.shipments.get(order_id)


# --- domain ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("country", "carrier"),
    [("DE", "DHL"), ("AT", "DHL"), ("FR", "Colissimo"), ("GB", "Royal Mail"),
     ("US", "UPS"), ("CA", "UPS"), ("JP", "DHL Express"), ("fr", "Colissimo")],
)
def test_carrier_is_chosen_by_destination_country(country: str, carrier: str) -> None:
    """Each destination has its carrier; anywhere else goes DHL Express."""
    assert carrier_for(country).name == carrier


def test_business_days_skip_the_weekend() -> None:
    """Friday + 1 is Monday, Friday + 2 Tuesday, Saturday + 1 Monday, Monday + 5 Monday."""
    assert FRIDAY.weekday() == 4
    assert add_business_days(FRIDAY, 1) == date(2024, 6, 10)
    assert add_business_days(FRIDAY, 2) == date(2024, 6, 11)
    assert add_business_days(date(2024, 6, 8), 1) == date(2024, 6, 10)
    assert add_business_days(date(2024, 6, 10), 5) == date(2024, 6, 17)
    assert add_business_days(FRIDAY, 0) == FRIDAY


def test_estimated_delivery_counts_the_carriers_business_days() -> None:
    """An order to Germany on a Friday (DHL, 2 days) arrives on Tuesday, not Sunday."""
    shipment = plan_shipment(uuid.uuid4(), "DE", FRIDAY)
    assert shipment.estimated_delivery == date(2024, 6, 11)
    assert shipment.estimated_delivery.weekday() < 5


def test_tracking_and_shipment_ids_are_deterministic() -> None:
    """The same order plans the same shipment; another order gets other ids."""
    order_id = uuid.uuid4()
    first = plan_shipment(order_id, "GB", FRIDAY)
    assert first == plan_shipment(order_id, "GB", FRIDAY)
    other = plan_shipment(uuid.uuid4(), "GB", FRIDAY)
    assert other.tracking_number != first.tracking_number
    assert other.shipment_id != first.shipment_id
    assert first.shipment_id == shipment_id(order_id)
    assert first.tracking_number == tracking_number(order_id, carrier_for("GB"))


def test_tracking_number_names_the_carrier() -> None:
    """The tracking number starts with the carrier's prefix and fits the event's limit."""
    number = tracking_number(uuid.uuid4(), carrier_for("US"))
    assert number.startswith("1Z-")
    assert len(number) <= 64


# --- handler with a fake store ---------------------------------------------------------------


def test_logistics_consumes_order_placed_and_announces_shipments() -> None:
    """Logistics consumes OrderPlaced, and only that; it says ShipmentScheduled."""
    assert service.consumes == (OrderPlaced,)
    assert service.produced == (ShipmentScheduled,)


async def test_schedule_shipment_stores_and_announces_the_shipment() -> None:
    """The shipment is stored and ShipmentScheduled carries it."""
    store = FakeShipmentStore()
    placed = make_order(country="FR", occurred_at=FRIDAY_MORNING)
    event = await schedule_shipment(placed, store)
    assert isinstance(event, ShipmentScheduled)
    stored = store.shipments[placed.order_id]
    assert (event.order_id, event.shipment_id, event.carrier, event.tracking_number,
            event.estimated_delivery) == (
        placed.order_id, stored.shipment_id, "Colissimo", stored.tracking_number,
        date(2024, 6, 12))


async def test_a_replay_schedules_the_same_shipment() -> None:
    """Handling the same OrderPlaced again (days later) gives the same ids and date."""
    placed = make_order(country="US", occurred_at=FRIDAY_MORNING)
    first = await schedule_shipment(placed, FakeShipmentStore())
    again = await schedule_shipment(placed, FakeShipmentStore())
    assert isinstance(first, ShipmentScheduled)
    assert isinstance(again, ShipmentScheduled)
    assert (first.shipment_id, first.tracking_number, first.estimated_delivery) == (
        again.shipment_id, again.tracking_number, again.estimated_delivery)


async def test_the_delivery_date_uses_the_utc_day_of_the_order() -> None:
    """Saturday 01:00 at UTC+2 is Friday in UTC: delivery counts from Friday."""
    placed = make_order(
        country="DE", occurred_at=datetime(2024, 6, 8, 1, 0, tzinfo=timezone(timedelta(hours=2))))
    event = await schedule_shipment(placed, FakeShipmentStore())
    assert isinstance(event, ShipmentScheduled)
    assert event.estimated_delivery == date(2024, 6, 11)


# --- CLI -----------------------------------------------------------------------------------


def test_cli_lists_and_shows_shipments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`shipments list --json` and `shipments show ORDER_ID` read logistics' database."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'logistics.db'}"
    monkeypatch.setenv("LOGISTICS_DATABASE_URL", url)
    shipment = plan_shipment(uuid.uuid4(), "GB", FRIDAY)

    async def seed() -> None:
        eng = make_engine(url)
        await create_tables(eng, metadata)
        async with eng.begin() as conn:
            await ShipmentStore(conn).add(shipment)
        await eng.dispose()

    asyncio.run(seed())
    runner = CliRunner()
    listed = runner.invoke(app, ["shipments", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert shipment.tracking_number in listed.output
    shown = runner.invoke(app, ["shipments", "show", str(shipment.order_id)])
    assert shown.exit_code == 0, shown.output
    assert "Royal Mail" in shown.output
    missing = runner.invoke(app, ["shipments", "show", str(uuid.uuid4())])
    assert missing.exit_code == 1
    assert "no shipment for order" in missing.output
    bad = runner.invoke(app, ["shipments", "show", "not-a-uuid"])
    assert bad.exit_code == 1
    assert "expected a UUID" in bad.output
