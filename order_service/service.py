"""The order service: places orders (its API), follows their outcomes, tracks every delivery.

Its handlers keep the outcomes the other services report; its tracker (`tracker.py`) keeps
the audit stream (subscribers' announcements and receipts), from which each order's fan-out
status is read. Orders are placed by the HTTP API (`api/`), which runs beside the consumers.
"""

from __future__ import annotations

from common.events import (
    DeliveryReceipt,
    DeliveryReceipts,
    Event,
    OrderPlaced,
    SellerNotified,
    ShipmentScheduled,
    StockReservationFailed,
    StockReserved,
    SubscriberAnnounced,
)
from common.kit.declare import Service
from common.kit.service import RejectedError
from order_service import tracker
from order_service.api.app import serve_api
from order_service.domain.order import OrderState
from order_service.settings import OrderSettings
from order_service.store import OrderStore
from order_service.store.tables import metadata, upgrade_schema

service = Service("order", store=OrderStore, tables=metadata, settings=OrderSettings,
                  on_start=upgrade_schema, metrics_port=9100, cli="order_service.cli:app")
service.produces(OrderPlaced)
service.alongside(serve_api)
# The tracker (order_service/tracker.py): the audit queue, and the receipts of our own
# deliveries, kept in our tables rather than sent to ourselves.
service.tracks(SubscriberAnnounced)(tracker.subscriber_announced)
service.tracks(DeliveryReceipt)(tracker.delivery_receipt)
service.tracks(DeliveryReceipts)(tracker.delivery_receipts)
service.keeps_receipts(OrderStore.record_deliveries)

#: Who may tell the order service each outcome. Where every service has a broker user of
#: its own, `producer` is the one the broker vouches for (`common.ops.access`); anyone else's
#: outcome is parked as a dead letter, not believed.
PRODUCERS: dict[type[Event], str] = {
    StockReserved: "inventory",
    StockReservationFailed: "inventory",
    ShipmentScheduled: "logistics",
    SellerNotified: "seller",
}


async def _record(event: StockReserved | StockReservationFailed | ShipmentScheduled
                  | SellerNotified, store: OrderStore, kind: str, fields: set[str]) -> None:
    """Keep an outcome of one of our orders from the service that owns it, or refuse it."""
    expected = PRODUCERS[type(event)]
    if event.producer != expected:
        raise RejectedError("untrusted_producer",
                            f"{event.event_type} for order {event.order_id} comes from "
                            f"{event.producer!r}; only {expected!r} reports it")
    if not await store.record_outcome(event.order_id, kind,
                                      event.model_dump(mode="json", include=fields),
                                      event.occurred_at, event.event_id, event.producer):
        # Orders are committed before their OrderPlaced is published, so a real outcome
        # always finds its order: this one answers an order nobody placed here.
        raise RejectedError("unknown_order",
                            f"{event.event_type} for order {event.order_id}, which this order "
                            "service never placed")


@service.handles(StockReserved)
async def stock_reserved(event: StockReserved, store: OrderStore) -> None:
    """Inventory reserved every line: the order is confirmed."""
    await _record(event, store, "stock_reserved", {"lines"})
    await store.advance_state(event.order_id, OrderState.CONFIRMED)


@service.handles(StockReservationFailed)
async def stock_reservation_failed(event: StockReservationFailed, store: OrderStore) -> None:
    """Inventory could not reserve the order: it is rejected, with the reason kept."""
    await _record(event, store, "stock_failed", {"reason", "lines"})
    await store.advance_state(event.order_id, OrderState.REJECTED)


@service.handles(ShipmentScheduled)
async def shipment_scheduled(event: ShipmentScheduled, store: OrderStore) -> None:
    """Logistics scheduled the shipment: keep carrier, tracking number and date."""
    await _record(event, store, "shipment",
                  {"shipment_id", "carrier", "tracking_number", "estimated_delivery"})
    # Any outcome proves OrderPlaced was published, even if its receipts come later.
    await store.advance_state(event.order_id, OrderState.PLACED)


@service.handles(SellerNotified)
async def seller_notified(event: SellerNotified, store: OrderStore) -> None:
    """A seller was told about its lines."""
    await _record(event, store, "seller", {"seller_id", "lines"})
    await store.advance_state(event.order_id, OrderState.PLACED)
