"""The order flow on a real broker: one OrderPlaced fans out to every subscriber, tracked."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import Event, OrderPlaced
from common.kit.runner import Runtime
from common.kit.service import ServiceSpec
from inventory_service.__main__ import SPEC as INVENTORY
from inventory_service.settings import InventorySettings
from inventory_service.store import StockStore
from logistics_service.__main__ import SPEC as LOGISTICS
from logistics_service.settings import LogisticsSettings
from logistics_service.store import ShipmentStore
from order_service.__main__ import SPEC as ORDER
from order_service.domain import NewOrder, OrderStatus, place_order
from order_service.settings import OrderSettings
from order_service.store import OrderStore
from seller_service.__main__ import SPEC as SELLER
from seller_service.settings import SellerSettings
from seller_service.store import InboxStore
from tests.factories import make_address, make_line
from tests.integration.support import StartService, wait_for

pytestmark = pytest.mark.integration

loyalty_metadata = MetaData()
points = Table("loyalty_points", loyalty_metadata,
               Column("id", Integer, primary_key=True),
               Column("order_id", String(36), nullable=False))


class PointsStore:
    """A fourth subscriber's store, defined only in this test."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn


async def award_points(event: OrderPlaced, store: PointsStore) -> Sequence[Event]:
    await store.conn.execute(insert(points).values(order_id=str(event.order_id)))
    return []


LOYALTY = ServiceSpec(name="loyalty", handlers={OrderPlaced: award_points}, store=PointsStore,
                      metadata=loyalty_metadata)


def new_order(*lines: tuple[str, int, str, str]) -> NewOrder:
    return NewOrder(
        customer_id="cust-flow", currency="EUR",
        lines=[make_line(sku, quantity, price=price, seller=seller)
               for sku, quantity, price, seller in lines],
        shipping_address=make_address(),
    )


async def place(order_rt: Runtime[Any], order: NewOrder) -> OrderPlaced:
    event = place_order(order)

    async def work(conn: AsyncConnection) -> Sequence[Event]:
        await OrderStore(conn).add_order(event)
        return [event]

    await order_rt.execute(work)
    return event


async def status(order_rt: Runtime[Any], order_id: uuid.UUID) -> OrderStatus:
    async with order_rt.engine.connect() as conn:
        found = await OrderStore(conn).status(order_id)
    assert found is not None
    return found


async def registered(order_rt: Runtime[Any], names: set[str]) -> bool:
    async with order_rt.engine.connect() as conn:
        known = {s.name for s in await OrderStore(conn).list_subscribers()}
    return names <= known


async def complete(order_rt: Runtime[Any], order_id: uuid.UUID) -> OrderStatus | None:
    found = await status(order_rt, order_id)
    return found if found.complete and found.subscribers else None


async def start_system(start_service: StartService) -> dict[str, Runtime[Any]]:
    runtimes = {
        "inventory": await start_service(INVENTORY, InventorySettings),
        "logistics": await start_service(LOGISTICS, LogisticsSettings),
        "seller": await start_service(SELLER, SellerSettings),
        "order": await start_service(ORDER, OrderSettings),
    }
    await wait_for(lambda: registered(runtimes["order"], {"inventory", "logistics", "seller"}),
                   what="the three subscribers in the registry")
    return runtimes


async def test_one_order_reaches_every_subscriber_once(start_service: StartService) -> None:
    """Stock reserved, one shipment, one notification per seller; status shows all handled."""
    rts = await start_system(start_service)
    event = await place(rts["order"], new_order(("SKU-BOOK-1", 2, "12.50", "seller-books"),
                                                ("SKU-MUG-1", 1, "8.00", "seller-home")))
    final = await wait_for(lambda: complete(rts["order"], event.order_id),
                           what="every subscriber to answer")
    assert {s.name: s.status for s in final.subscribers} == {
        "inventory": "handled", "logistics": "handled", "seller": "handled"}
    # The order service sees the outcome events too (they arrive after the receipts).
    final = await wait_for(
        lambda: _with_outcomes(rts["order"], event.order_id, {"stock_reserved", "shipment",
                                                              "seller"}),
        what="the domain outcomes")
    assert final.state == "confirmed"
    assert sum(1 for o in final.outcomes if o.kind == "seller") == 2

    async with rts["inventory"].engine.connect() as conn:
        stock = {row.sku: row for row in await StockStore(conn).list_stock()}
    assert stock["SKU-BOOK-1"].reserved == 2
    async with rts["logistics"].engine.connect() as conn:
        shipments = [s for s in await ShipmentStore(conn).list_shipments()
                     if s.order_id == event.order_id]
    assert len(shipments) == 1
    async with rts["seller"].engine.connect() as conn:
        books = await InboxStore(conn).inbox("seller-books")
        home = await InboxStore(conn).inbox("seller-home")
    assert [n.order_id for n in books].count(event.order_id) == 1
    assert [n.order_id for n in home].count(event.order_id) == 1


async def _with_outcomes(order_rt: Runtime[Any], order_id: uuid.UUID,
                         kinds: set[str]) -> OrderStatus | None:
    found = await status(order_rt, order_id)
    return found if kinds <= {o.kind for o in found.outcomes} else None


async def test_an_order_for_too_much_stock_is_rejected(start_service: StartService) -> None:
    """More than the stock holds: StockReservationFailed, nothing reserved, order rejected."""
    rts = await start_system(start_service)
    event = await place(rts["order"], new_order(("SKU-LAMP-1", 50, "30.00", "seller-home")))
    final = await wait_for(
        lambda: _with_outcomes(rts["order"], event.order_id, {"stock_failed"}),
        what="the reservation to fail")
    assert final.state == "rejected"
    async with rts["inventory"].engine.connect() as conn:
        stock = {row.sku: row for row in await StockStore(conn).list_stock()}
    assert stock["SKU-LAMP-1"].reserved == 0


async def test_a_subscriber_added_later_shows_up_with_no_change_to_the_order_service(
        start_service: StartService) -> None:
    """A fourth service, defined only here, gets the same events and appears in the status."""
    rts = await start_system(start_service)
    loyalty = await start_service(LOYALTY)
    await wait_for(lambda: registered(rts["order"], {"loyalty"}), what="loyalty to register")
    event = await place(rts["order"], new_order(("SKU-BOOK-1", 1, "12.50", "seller-books")))
    final = await wait_for(lambda: complete(rts["order"], event.order_id),
                           what="all four subscribers to answer")
    by_name = {s.name: s for s in final.subscribers}
    assert by_name["loyalty"].status == "handled"
    assert by_name["loyalty"].expected
    assert set(by_name) == {"inventory", "logistics", "seller", "loyalty"}
    async with loyalty.engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(points).where(
            points.c.order_id == str(event.order_id)))).scalar_one()
    assert count == 1
