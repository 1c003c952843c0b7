"""The order every case sends: two lines, two SKUs, two sellers, as a shop would see it."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from common.events import Address, OrderLine, OrderPlaced, new_id
from common.kit.broker import message_for
from common.kit.db import create_tables, make_engine
from common.kit.outbox import kit_metadata
from inventory_service.store import StockStore
from inventory_service.store import metadata as inventory_metadata
from order_service.domain.order import NewOrder, place_order

#: (SKU, seller, unit price) of each line.
LINES = (("SKU-BENCH-A", "seller-bench-a", "4.50"), ("SKU-BENCH-B", "seller-bench-b", "7.25"))
#: Per order, the rows each subscriber writes: a reservation per SKU, one shipment, a
#: notification per seller. The completion checks count rows with these.
ROWS_PER_ORDER = {"inventory": len(LINES), "logistics": 1, "seller": len(LINES)}
#: Far more stock than any run orders: every reservation succeeds.
STOCK = 1_000_000_000

ADDRESS = {"name": "Ada Lovelace", "street": "12 Analytical Row", "city": "Berlin",
           "postal_code": "10115", "country": "DE"}


def order_body(customer: str = "cust-bench") -> dict[str, Any]:
    """The JSON body of POST /orders."""
    return {
        "customer_id": customer,
        "currency": "EUR",
        "lines": [{"sku": sku, "quantity": 1, "unit_price": price, "seller_id": seller}
                  for sku, seller, price in LINES],
        "total": str(sum(Decimal(price) for _, _, price in LINES)),
        "shipping_address": ADDRESS,
    }


def new_order(customer: str = "cust-bench") -> NewOrder:
    """What the API builds from that body."""
    return NewOrder(
        customer_id=customer,
        lines=[OrderLine(sku=sku, quantity=1, unit_price=Decimal(price), seller_id=seller)
               for sku, seller, price in LINES],
        currency="EUR",
        shipping_address=Address(**ADDRESS),
        total=sum((Decimal(price) for _, _, price in LINES), Decimal("0.00")),
    )


_TEMPLATE = place_order(new_order())


def order_placed() -> OrderPlaced:
    """A fresh OrderPlaced (new event and order ids) as the order service publishes it."""
    order_id = new_id()
    return _TEMPLATE.model_copy(update={"event_id": new_id(), "order_id": order_id,
                                        "correlation_id": str(order_id)})


def order_message() -> tuple[bytes, Any]:
    """A fresh OrderPlaced on the wire: its body and the AMQP message the kit would send."""
    event = order_placed()
    body = event.model_dump_json().encode()
    return body, message_for(event, body)


async def seed_stock(data_dir: Path) -> None:
    """Enough stock for every SKU of the bench order, before the inventory service starts."""
    engine = make_engine(f"sqlite+aiosqlite:///{data_dir / 'inventory.db'}")
    try:
        await create_tables(engine, kit_metadata, inventory_metadata)
        async with engine.begin() as conn:
            for sku, _seller, _price in LINES:
                await StockStore(conn).set_stock(sku, STOCK)
    finally:
        await engine.dispose()
