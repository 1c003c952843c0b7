"""Builders for the orders tests need: lines, an address, a whole OrderPlaced.

Each builder has plain defaults, so a test names only what it is about.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

from common.events import Address, OrderLine, OrderPlaced


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
