"""What the order service does on the other services' outcomes and on the audit stream."""

from __future__ import annotations

from datetime import UTC, datetime

from common.events import (
    DeliveryReceipt,
    DeliveryReceipts,
    Event,
    SellerNotified,
    ShipmentScheduled,
    StockReservationFailed,
    StockReserved,
    SubscriberAnnounced,
)
from common.service import Handler
from common.telemetry import RECEIPT_LAG
from order_service.domain import OrderState
from order_service.store import OrderStore


async def stock_reserved(event: StockReserved, store: OrderStore) -> list[Event]:
    """Inventory reserved every line: the order is confirmed."""
    await store.record_outcome(event.order_id, "stock_reserved",
                               event.model_dump(mode="json", include={"lines"}),
                               event.occurred_at, event.event_id, event.producer)
    await store.advance_state(event.order_id, OrderState.CONFIRMED)
    return []


async def stock_reservation_failed(event: StockReservationFailed,
                                   store: OrderStore) -> list[Event]:
    """Inventory could not reserve the order: it is rejected, with the reason kept."""
    await store.record_outcome(event.order_id, "stock_failed",
                               event.model_dump(mode="json", include={"reason", "lines"}),
                               event.occurred_at, event.event_id, event.producer)
    await store.advance_state(event.order_id, OrderState.REJECTED)
    return []


async def shipment_scheduled(event: ShipmentScheduled, store: OrderStore) -> list[Event]:
    """Logistics scheduled the shipment: keep carrier, tracking number and date."""
    await store.record_outcome(
        event.order_id, "shipment",
        event.model_dump(mode="json", include={"shipment_id", "carrier", "tracking_number",
                                               "estimated_delivery"}),
        event.occurred_at, event.event_id, event.producer)
    # Any outcome proves OrderPlaced was published, even if its receipts come later.
    await store.advance_state(event.order_id, OrderState.PLACED)
    return []


async def seller_notified(event: SellerNotified, store: OrderStore) -> list[Event]:
    """A seller was told about its lines."""
    await store.record_outcome(event.order_id, "seller",
                               event.model_dump(mode="json", include={"seller_id", "lines"}),
                               event.occurred_at, event.event_id, event.producer)
    await store.advance_state(event.order_id, OrderState.PLACED)
    return []


async def subscriber_announced(event: SubscriberAnnounced, store: OrderStore) -> list[Event]:
    """A subscriber started: register it, or refresh it (first_seen stays)."""
    await store.upsert_subscriber(event)
    return []


async def delivery_receipt(event: DeliveryReceipt, store: OrderStore) -> list[Event]:
    """A subscriber reported what it did with a delivery: keep it for the order's status.

    Receipts of other flows (no order of ours) are kept as well, unlinked: an operator can
    still see a dead-lettered unreadable message there.
    """
    await store.record_delivery(event)
    RECEIPT_LAG.labels(event.subscriber, event.outcome).observe(
        max(0.0, (datetime.now(UTC) - event.occurred_at).total_seconds()))
    return []


async def delivery_receipts(event: DeliveryReceipts, store: OrderStore) -> list[Event]:
    """A subscriber's receipts for a batch of deliveries it handled together."""
    await store.record_deliveries(event.receipts)
    now = datetime.now(UTC)
    for receipt in event.receipts:
        RECEIPT_LAG.labels(receipt.subscriber, receipt.outcome).observe(
            max(0.0, (now - receipt.occurred_at).total_seconds()))
    return []


HANDLERS: dict[type[Event], Handler[OrderStore]] = {
    StockReserved: stock_reserved,
    StockReservationFailed: stock_reservation_failed,
    ShipmentScheduled: shipment_scheduled,
    SellerNotified: seller_notified,
}

AUDIT_HANDLERS: dict[type[Event], Handler[OrderStore]] = {
    SubscriberAnnounced: subscriber_announced,
    DeliveryReceipt: delivery_receipt,
    DeliveryReceipts: delivery_receipts,
}
