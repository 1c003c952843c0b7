"""The order flow on a real broker: one OrderPlaced fans out to every subscriber, tracked."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import aio_pika
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import (
    EVENT_TYPES,
    Event,
    OrderPlaced,
    SellerNotified,
    ShipmentScheduled,
    StockReserved,
)
from common.kit.declare import Service
from common.kit.runner import Runtime
from common.kit.topology import Topology
from inventory_service.service import service as inventory
from inventory_service.store import StockStore
from logistics_service.service import service as logistics
from logistics_service.store import ShipmentStore
from order_service.domain.order import NewOrder, place_order
from order_service.domain.views import OrderStatus
from order_service.service import service as order
from order_service.store import OrderStore
from seller_service.service import service as seller
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


loyalty = Service("loyalty", store=PointsStore, tables=loyalty_metadata)


@loyalty.handles(OrderPlaced)
async def award_points(event: OrderPlaced, store: PointsStore) -> None:
    await store.conn.execute(insert(points).values(order_id=str(event.order_id)))


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
        "inventory": await start_service(inventory),
        "logistics": await start_service(logistics),
        "seller": await start_service(seller),
        "order": await start_service(order),
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


async def test_every_outcome_is_in_the_orders_flow_caused_by_its_order_placed(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection,
        name_prefix: str) -> None:
    """What each subscriber publishes carries the order's correlation id, its OrderPlaced as
    cause and the subscriber as producer: the kit fills them in, the handlers do not."""
    rts = await start_system(start_service)
    channel = await amqp.channel()
    copies = await channel.declare_queue(exclusive=True)  # a copy of every outcome, ours only
    for cls in (StockReserved, ShipmentScheduled, SellerNotified):
        await copies.bind(Topology(name_prefix).exchange(cls))
    placed = await place(rts["order"], new_order(("SKU-BOOK-1", 1, "12.50", "seller-books")))
    outcomes: dict[str, Event] = {}

    async def all_three() -> bool:
        message = await copies.get(no_ack=True, fail=False)
        if message is not None:
            event = EVENT_TYPES[message.type or ""].model_validate_json(message.body)
            outcomes[event.event_type] = event
        return len(outcomes) == 3

    await wait_for(all_three, what="StockReserved, ShipmentScheduled and SellerNotified")
    assert {name: e.producer for name, e in outcomes.items()} == {
        "StockReserved": "inventory", "ShipmentScheduled": "logistics",
        "SellerNotified": "seller"}
    for event in outcomes.values():
        assert event.correlation_id == placed.correlation_id
        assert event.causation_id == placed.event_id


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
    loyalty_rt = await start_service(loyalty)
    await wait_for(lambda: registered(rts["order"], {"loyalty"}), what="loyalty to register")
    event = await place(rts["order"], new_order(("SKU-BOOK-1", 1, "12.50", "seller-books")))
    final = await wait_for(lambda: complete(rts["order"], event.order_id),
                           what="all four subscribers to answer")
    by_name = {s.name: s for s in final.subscribers}
    assert by_name["loyalty"].status == "handled"
    assert by_name["loyalty"].expected
    assert set(by_name) == {"inventory", "logistics", "seller", "loyalty"}
    async with loyalty_rt.engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(points).where(
            points.c.order_id == str(event.order_id)))).scalar_one()
    assert count == 1
