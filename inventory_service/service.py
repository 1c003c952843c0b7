"""The inventory service: reserve an order's stock, all of it or none."""

from __future__ import annotations

from pydantic import Field
from sqlalchemy.ext.asyncio import AsyncEngine

from common.events import OrderPlaced, StockReservationFailed, StockReserved
from common.kit.declare import Service
from common.kit.settings import ServiceSettings
from inventory_service.domain import plan_reservation
from inventory_service.store import StockStore, metadata, seed_catalogue


class InventorySettings(ServiceSettings):
    """Inventory's own settings (INVENTORY_*)."""

    seed_catalogue: bool = Field(True, description="Load the demo catalogue into an empty stock.")


async def seed_demo_stock(engine: AsyncEngine, settings: InventorySettings) -> None:
    """The demo catalogue in an empty stock, unless INVENTORY_SEED_CATALOGUE is false."""
    if settings.seed_catalogue:
        await seed_catalogue(engine)


service = Service("inventory", store=StockStore, tables=metadata, settings=InventorySettings,
                  on_start=seed_demo_stock, metrics_port=9101, cli="inventory_service.cli:app")


@service.handles(OrderPlaced)
async def reserve_stock(event: OrderPlaced, stock: StockStore
                        ) -> StockReserved | StockReservationFailed:
    """Reserve every line of the order, or none of them, and say which it was."""
    levels = await stock.levels(line.sku for line in event.lines)
    plan = plan_reservation(event.lines, levels)
    if not plan.ok:
        return StockReservationFailed(order_id=event.order_id, reason=plan.summary,
                                      lines=plan.unreservable)
    # Raises ReservationConflictError if a concurrent order took the units meanwhile; the
    # kit then rolls back the delivery, so no line stays half-reserved.
    await stock.reserve(event.order_id, plan.reserved)
    return StockReserved(order_id=event.order_id, lines=plan.reserved)
