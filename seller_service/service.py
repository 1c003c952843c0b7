"""The seller service: tell each seller in an order about its own lines."""

from __future__ import annotations

from common.events import OrderPlaced, SellerNotified
from common.kit.declare import Service
from seller_service.domain import group_by_seller
from seller_service.store import InboxStore, metadata

service = Service("seller", store=InboxStore, tables=metadata, metrics_port=9103,
                  cli="seller_service.cli:app")


@service.handles(OrderPlaced)
async def notify_sellers(event: OrderPlaced, inbox: InboxStore) -> list[SellerNotified]:
    """One inbox entry and one SellerNotified per seller in the order."""
    notified = []
    for share in group_by_seller(event.lines):
        await inbox.add(event.order_id, share, event.currency)
        notified.append(SellerNotified(order_id=event.order_id, seller_id=share.seller_id,
                                       lines=share.lines))
    return notified
