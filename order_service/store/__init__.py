"""The order service's store: its tables, and the one store class its handlers and API use.

`OrderStore` is made of one part per thing it keeps, each in its own module:
- `tables.py`: the tables, and bringing an older database up to date;
- `registry.py`: the subscribers that announced themselves;
- `orders.py`: the orders and the outcomes the other services report;
- `receipts.py`: what each subscriber did with each delivery;
- `status.py`: what is read about orders (status, lists, timeline) with their fan-out;
- `settling.py`: orders finally answered, set aside so late ones are found quickly.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from order_service.store.receipts import Receipts
from order_service.store.settling import Settling


class OrderStore(Settling, Receipts):
    """The order service's data, on one connection (the caller owns the transaction)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
