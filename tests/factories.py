"""Builders for the orders tests need: lines, an address, a whole OrderPlaced, any event.

Each builder has plain defaults, so a test names only what it is about.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TypeVar

from common.events import (
    Address,
    Event,
    OrderLine,
    OrderPlaced,
    ReservedLine,
    SellerNotified,
    ShipmentScheduled,
    StockReservationFailed,
    StockReserved,
    UnreservableLine,
)

E = TypeVar("E", bound=Event)


def make_line(sku: str = "SKU-1", quantity: int = 1, *, price: str = "1.00",
              seller: str = "seller-a") -> OrderLine:
    """One order line: `quantity` x `sku` at `price`, sold by `seller`."""
    return OrderLine(sku=sku, quantity=quantity, unit_price=Decimal(price), seller_id=seller)


def make_address(country: str = "DE") -> Address:
    """A valid shipping address in `country`."""
    return Address(name="Ada", street="1 Row", city="Berlin", postal_code="10115",
                   country=country)


def make_order(*lines: OrderLine, customer: str = "cust-1", country: str = "DE",
               currency: str = "EUR", occurred_at: datetime | None = None,
               producer: str | None = None) -> OrderPlaced:
    """An OrderPlaced of `lines` (one default line if none), totalled, in its own flow.

    The order id is new each time and is the correlation id, as the order service sets it.
    """
    order_lines = lines or (make_line(),)
    order_id = uuid.uuid4()
    return OrderPlaced(
        order_id=order_id,
        customer_id=customer,
        lines=order_lines,
        currency=currency,
        total=sum((ln.line_total for ln in order_lines), Decimal(0)),
        shipping_address=make_address(country),
        correlation_id=str(order_id),
        occurred_at=occurred_at or datetime.now(UTC),
        producer=producer,
    )


#: Each business event, about an order: what `make_event` builds.
_ABOUT_AN_ORDER: dict[type[Event], Callable[[OrderPlaced], Event]] = {
    OrderPlaced: lambda order: order,
    StockReserved: lambda order: StockReserved(
        order_id=order.order_id, correlation_id=order.correlation_id,
        lines=tuple(ReservedLine(sku=line.sku, quantity=line.quantity) for line in order.lines)),
    StockReservationFailed: lambda order: StockReservationFailed(
        order_id=order.order_id, correlation_id=order.correlation_id,
        reason=f"not enough stock for {order.lines[0].sku}",
        lines=(UnreservableLine(sku=order.lines[0].sku, requested=order.lines[0].quantity,
                                available=0, reason="insufficient_stock"),)),
    ShipmentScheduled: lambda order: ShipmentScheduled(
        order_id=order.order_id, correlation_id=order.correlation_id,
        shipment_id=uuid.uuid4(), carrier="DHL", tracking_number="DHL-4F7A9C21",
        estimated_delivery=date.today() + timedelta(days=2)),
    SellerNotified: lambda order: SellerNotified(
        order_id=order.order_id, correlation_id=order.correlation_id,
        seller_id=order.lines[0].seller_id, lines=order.lines),
}


def make_event(cls: type[E]) -> E:
    """A valid `cls`, any business event, about a new order and in its flow.

    The tests `shop new subscriber` writes build the events their service handles with it.
    """
    build = _ABOUT_AN_ORDER.get(cls)
    if build is None:
        raise LookupError(f"no example of {cls.__name__}: add one to tests/factories.py")
    event = build(make_order())
    assert isinstance(event, cls)
    return event
