"""Inventory's own tables: stock per SKU and the reservations made against it."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.events import ReservedLine
from common.kit.db import UTCDateTime

metadata = sa.MetaData()

# Stock keeps the units counted in the warehouse (`on_hand`, what an operator sets) apart
# from the units promised to orders (`reserved`); what new orders may take is the
# difference. Keeping both, rather than one `available` column that reservations decrement,
# means an operator's recount does not wipe out the reservations, and the table says at a
# glance how much is promised. The checks make the database itself refuse an oversell,
# whatever code path tries it.
stock = sa.Table(
    "stock",
    metadata,
    sa.Column("sku", sa.String(64), primary_key=True),
    sa.Column("on_hand", sa.Integer, nullable=False),
    sa.Column("reserved", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.CheckConstraint("on_hand >= 0", name="stock_on_hand_not_negative"),
    sa.CheckConstraint("reserved >= 0", name="stock_reserved_not_negative"),
    sa.CheckConstraint("reserved <= on_hand", name="stock_not_oversold"),
)

# One row per order and SKU: what each order holds, so a later issue can release or ship it.
# The primary key also refuses to reserve the same order twice.
reservations = sa.Table(
    "reservations",
    metadata,
    sa.Column("order_id", sa.Uuid, primary_key=True),
    sa.Column("sku", sa.String(64), sa.ForeignKey("stock.sku"), primary_key=True),
    sa.Column("quantity", sa.Integer, sa.CheckConstraint("quantity >= 1"), nullable=False),
    sa.Column("reserved_at", UTCDateTime(), nullable=False),
)

#: The demo catalogue loaded into an empty stock table (SKU -> units on hand).
DEMO_CATALOGUE: dict[str, int] = {
    "SKU-BOOK-1": 100,
    "SKU-MUG-1": 50,
    "SKU-TSHIRT-M": 25,
    "SKU-TSHIRT-L": 25,
    "SKU-LAMP-1": 3,
}



# The hot statements, built once (a statement built per call costs SQLAlchemy more than the
# database takes to run it).
_LEVELS = (sa.select(stock.c.sku, stock.c.on_hand - stock.c.reserved)
           .where(stock.c.sku.in_(sa.bindparam("skus", expanding=True)))
           .order_by(stock.c.sku)
           .with_for_update())
_RESERVE = (stock.update()
            .where(stock.c.sku == sa.bindparam("line_sku"))
            .where(stock.c.on_hand - stock.c.reserved >= sa.bindparam("quantity"))
            .values(reserved=stock.c.reserved + sa.bindparam("quantity"),
                    updated_at=sa.bindparam("now")))

class ReservationConflictError(RuntimeError):
    """A concurrent change took the stock between the check and the reservation.

    Raised so the kit rolls the whole delivery back: nothing of the order stays reserved.
    """


class StockBelowReservedError(ValueError):
    """An operator tried to set on-hand stock below what orders already hold."""


@dataclass(frozen=True)
class StockLevel:
    """One SKU's stock as the operator sees it."""

    sku: str
    on_hand: int
    reserved: int
    updated_at: datetime

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


class StockStore:
    """Stock and reservations, on the connection (and transaction) it is given."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def levels(self, skus: Iterable[str]) -> dict[str, int]:
        """Units available for new orders, per known SKU; unknown SKUs are left out.

        The rows are locked in SKU order (FOR UPDATE, ignored by SQLite, which locks the
        whole file on write) so on PostgreSQL a concurrent order for the same SKU waits for
        this transaction instead of failing at the guarded update below.
        """
        wanted = sorted(set(skus))
        if not wanted:
            return {}
        rows = await self._conn.execute(_LEVELS, {"skus": wanted})
        return {sku: int(available) for sku, available in rows}

    async def reserve(self, order_id: uuid.UUID, lines: Sequence[ReservedLine]) -> None:
        """Take `lines` out of the available stock for `order_id`, all or nothing.

        Each decrement is guarded (`... AND on_hand - reserved >= qty`): if a concurrent
        transaction took the units since `levels()`, the update touches no row and we raise,
        so the caller's transaction rolls back every line already reserved.
        """
        now = datetime.now(UTC)
        # A fixed (SKU) order for the updates: two orders sharing SKUs then lock them in the
        # same order and cannot deadlock each other on PostgreSQL.
        for line in sorted(lines, key=lambda ln: ln.sku):
            result = await self._conn.execute(
                _RESERVE, {"line_sku": line.sku, "quantity": line.quantity, "now": now})
            if result.rowcount != 1:
                raise ReservationConflictError(
                    f"cannot reserve {line.quantity} x {line.sku} for order {order_id}: "
                    "the stock changed concurrently or the SKU is unknown"
                )
        if lines:
            await self._conn.execute(
                reservations.insert(),
                [{"order_id": order_id, "sku": ln.sku, "quantity": ln.quantity,
                  "reserved_at": now} for ln in lines],
            )

    async def reserved_for(self, order_id: uuid.UUID) -> dict[str, int]:
        """What `order_id` holds, per SKU (empty if nothing)."""
        rows = await self._conn.execute(
            sa.select(reservations.c.sku, reservations.c.quantity)
            .where(reservations.c.order_id == order_id)
            .order_by(reservations.c.sku)
        )
        return {sku: int(quantity) for sku, quantity in rows}

    async def set_stock(self, sku: str, quantity: int) -> StockLevel:
        """Set the units on hand for `sku` (adding it to the catalogue if new).

        Raises StockBelowReservedError if orders already hold more than `quantity`.
        """
        if quantity < 0:
            raise ValueError("stock quantity must be >= 0")
        now = datetime.now(UTC)
        # Update first, insert if no row: portable (no dialect-specific upsert), and the
        # guard keeps the recount from going under the units already promised.
        result = await self._conn.execute(
            stock.update()
            .where(stock.c.sku == sku)
            .where(stock.c.reserved <= quantity)
            .values(on_hand=quantity, updated_at=now)
        )
        if result.rowcount != 1:
            held = await self._conn.scalar(sa.select(stock.c.reserved).where(stock.c.sku == sku))
            if held is not None:
                raise StockBelowReservedError(
                    f"{sku}: orders hold {held} reserved units, so on-hand stock cannot be set "
                    f"to {quantity} (set it to {held} or more)"
                )
            await self._conn.execute(
                stock.insert().values(sku=sku, on_hand=quantity, reserved=0, updated_at=now)
            )
        level = await self.get(sku)
        if level is None:  # pragma: no cover - written just above, in this transaction
            raise LookupError(f"{sku} vanished while being set")
        return level

    async def get(self, sku: str) -> StockLevel | None:
        """One SKU's stock, or None if it is not in the catalogue."""
        row = (await self._conn.execute(sa.select(stock).where(stock.c.sku == sku))).first()
        if row is None:
            return None
        return StockLevel(sku=row.sku, on_hand=row.on_hand, reserved=row.reserved,
                          updated_at=row.updated_at)

    async def list_stock(self) -> list[StockLevel]:
        """Every SKU, sorted."""
        rows = await self._conn.execute(sa.select(stock).order_by(stock.c.sku))
        return [StockLevel(sku=row.sku, on_hand=row.on_hand, reserved=row.reserved,
                           updated_at=row.updated_at) for row in rows]


async def seed_catalogue(engine: AsyncEngine) -> None:
    """Load DEMO_CATALOGUE into the stock table, only if the table is empty.

    Used as the service's `on_start` when `INVENTORY_SEED_CATALOGUE` is true. An operator's
    own stock is never touched: one row of any SKU and the seed does nothing.
    """
    now = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            count = await conn.scalar(sa.select(sa.func.count()).select_from(stock))
            if count:
                return
            await conn.execute(
                stock.insert(),
                [{"sku": sku, "on_hand": units, "reserved": 0, "updated_at": now}
                 for sku, units in DEMO_CATALOGUE.items()],
            )
    except IntegrityError:
        # Another replica seeded the empty table at the same moment; its rows are ours.
        return
