"""The logistics service: plan each order's shipment and announce it."""

from __future__ import annotations

from datetime import UTC

from common.events import OrderPlaced, ShipmentScheduled
from common.kit.declare import Service
from logistics_service.domain import plan_shipment
from logistics_service.store import ShipmentStore, metadata

service = Service("logistics", store=ShipmentStore, tables=metadata, metrics_port=9102,
                  cli="logistics_service.cli:app")


@service.handles(OrderPlaced)
async def schedule_shipment(event: OrderPlaced, shipments: ShipmentStore) -> ShipmentScheduled:
    """Plan the order's shipment, store it, and announce it."""
    # The date comes from the event, not the clock, so a replay plans the same delivery day.
    placed_on = event.occurred_at.astimezone(UTC).date()
    shipment = plan_shipment(event.order_id, event.shipping_address.country, placed_on)
    await shipments.add(shipment)
    return ShipmentScheduled(
        order_id=shipment.order_id,
        shipment_id=shipment.shipment_id,
        carrier=shipment.carrier,
        tracking_number=shipment.tracking_number,
        estimated_delivery=shipment.estimated_delivery,
    )
