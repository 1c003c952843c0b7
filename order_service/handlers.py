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
from common.kit.service import Handler, RejectedError
from common.kit.telemetry import RECEIPT_LAG
from order_service.domain import OrderState
from order_service.store import OrderStore

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


async def stock_reserved(event: StockReserved, store: OrderStore) -> list[Event]:
    """Inventory reserved every line: the order is confirmed."""
    await _record(event, store, "stock_reserved", {"lines"})
    await store.advance_state(event.order_id, OrderState.CONFIRMED)
    return []


async def stock_reservation_failed(event: StockReservationFailed,
                                   store: OrderStore) -> list[Event]:
    """Inventory could not reserve the order: it is rejected, with the reason kept."""
    await _record(event, store, "stock_failed", {"reason", "lines"})
    await store.advance_state(event.order_id, OrderState.REJECTED)
    return []


async def shipment_scheduled(event: ShipmentScheduled, store: OrderStore) -> list[Event]:
    """Logistics scheduled the shipment: keep carrier, tracking number and date."""
    await _record(event, store, "shipment",
                  {"shipment_id", "carrier", "tracking_number", "estimated_delivery"})
    # Any outcome proves OrderPlaced was published, even if its receipts come later.
    await store.advance_state(event.order_id, OrderState.PLACED)
    return []


async def seller_notified(event: SellerNotified, store: OrderStore) -> list[Event]:
    """A seller was told about its lines."""
    await _record(event, store, "seller", {"seller_id", "lines"})
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
