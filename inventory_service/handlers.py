"""What inventory does on each event it consumes."""

from __future__ import annotations

from common.events import Event, OrderPlaced, StockReservationFailed, StockReserved
from common.kit.service import Handler
from inventory_service.domain import plan_reservation
from inventory_service.settings import InventorySettings
from inventory_service.store import StockStore

SERVICE_NAME = InventorySettings.service_name


async def reserve_stock(event: OrderPlaced, stock: StockStore) -> list[Event]:
    """Reserve every line of the order, or none of them, and say which it was."""
    levels = await stock.levels(line.sku for line in event.lines)
    plan = plan_reservation(event.lines, levels)
    outcome: Event
    if plan.ok:
        # Raises ReservationConflictError if a concurrent order took the units meanwhile; the
        # kit then rolls back the delivery, so no line stays half-reserved.
        await stock.reserve(event.order_id, plan.reserved)
        outcome = StockReserved(order_id=event.order_id, lines=plan.reserved)
    else:
        outcome = StockReservationFailed(order_id=event.order_id, reason=plan.summary,
                                         lines=plan.unreservable)
    return [outcome.caused(event, producer=SERVICE_NAME)]


HANDLERS: dict[type[Event], Handler[StockStore]] = {
    OrderPlaced: reserve_stock,
}
