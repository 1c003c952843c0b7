"""What logistics does on each event it consumes."""

from __future__ import annotations

from datetime import UTC

from common.events import Event, OrderPlaced, ShipmentScheduled
from common.kit.service import Handler
from logistics_service.domain import plan_shipment
from logistics_service.settings import LogisticsSettings
from logistics_service.store import ShipmentStore

SERVICE_NAME = LogisticsSettings.service_name


async def schedule_shipment(event: OrderPlaced, shipments: ShipmentStore) -> list[Event]:
    """Plan the order's shipment, store it, and announce it."""
    # The date comes from the event, not the clock, so a replay plans the same delivery day.
    placed_on = event.occurred_at.astimezone(UTC).date()
    shipment = plan_shipment(event.order_id, event.shipping_address.country, placed_on)
    await shipments.add(shipment)
    scheduled = ShipmentScheduled(
        order_id=shipment.order_id,
        shipment_id=shipment.shipment_id,
        carrier=shipment.carrier,
        tracking_number=shipment.tracking_number,
        estimated_delivery=shipment.estimated_delivery,
    )
    return [scheduled.caused(event, producer=SERVICE_NAME)]


HANDLERS: dict[type[Event], Handler[ShipmentStore]] = {
    OrderPlaced: schedule_shipment,
}
