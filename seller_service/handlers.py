"""What the seller service does on each event it consumes."""

from __future__ import annotations

from common.events import Event, OrderPlaced, SellerNotified
from common.kit.service import Handler
from seller_service.domain import group_by_seller
from seller_service.settings import SellerSettings
from seller_service.store import InboxStore

SERVICE_NAME = SellerSettings.service_name


async def notify_sellers(event: OrderPlaced, inbox: InboxStore) -> list[Event]:
    """Tell each seller in the order about its own lines: one inbox entry and event each."""
    notified: list[Event] = []
    for share in group_by_seller(event.lines):
        await inbox.add(event.order_id, share, event.currency)
        notified.append(
            SellerNotified(order_id=event.order_id, seller_id=share.seller_id, lines=share.lines)
            .caused(event, producer=SERVICE_NAME)
        )
    return notified


HANDLERS: dict[type[Event], Handler[InboxStore]] = {
    OrderPlaced: notify_sellers,
}
