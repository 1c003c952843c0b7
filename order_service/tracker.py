"""The order service's tracker: what the subscribers say about themselves and their deliveries.

The audit queue brings each subscriber's announcements (the registry: who consumes what)
and its delivery receipts (what it did with each delivery), from which every order's
fan-out status is read. Orders every expected subscriber has finally answered are settled
now and then, so that finding the late ones looks only at the few that are not.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import DeliveryReceipt, DeliveryReceipts, SubscriberAnnounced
from common.kit.logging import get_logger
from common.kit.telemetry import RECEIPT_LAG
from order_service.store import OrderStore

log = get_logger(__name__)
T = TypeVar("T")


async def subscriber_announced(event: SubscriberAnnounced, store: OrderStore) -> None:
    """A subscriber started: register it, or refresh it (first_seen stays)."""
    await store.upsert_subscriber(event)


async def delivery_receipt(event: DeliveryReceipt, store: OrderStore) -> None:
    """A subscriber reported what it did with a delivery: keep it for the order's status.

    Receipts of other flows (no order of ours) are kept as well, unlinked: an operator can
    still see a dead-lettered unreadable message there.
    """
    await store.record_delivery(event)
    RECEIPT_LAG.labels(event.subscriber, event.outcome).observe(
        max(0.0, (datetime.now(UTC) - event.occurred_at).total_seconds()))


async def delivery_receipts(event: DeliveryReceipts, store: OrderStore) -> None:
    """A subscriber's receipts for a batch of deliveries it handled together."""
    await store.record_deliveries(event.receipts)
    now = datetime.now(UTC)
    for receipt in event.receipts:
        RECEIPT_LAG.labels(receipt.subscriber, receipt.outcome).observe(
            max(0.0, (now - receipt.occurred_at).total_seconds()))


class Transactions(Protocol):
    """Runs work in a transaction and returns what it computed, once committed (the running
    service's group commit, `common.kit.commit.GroupCommit`)."""

    async def run(self, work: Callable[[AsyncConnection], Coroutine[Any, Any, T]]) -> T: ...


async def settle_answered(commits: Transactions, now: datetime, cutoff: datetime) -> None:
    """Mark settled the orders answered since the last look (`OrderStore.settle_answered`),
    a chunk per transaction, so the late-orders scan that follows reads only the rest."""
    after: datetime | None = None
    while True:
        after = await commits.run(functools.partial(_settle_chunk, now, cutoff, after))
        if after is None:
            return


async def _settle_chunk(now: datetime, cutoff: datetime, after: datetime | None,
                        conn: AsyncConnection) -> datetime | None:
    return await OrderStore(conn).settle_answered(now, cutoff, after=after)


async def settle_forever(commits: Transactions, late_after: timedelta, *, every: float) -> None:
    """Settle the answered orders every `every` seconds, so that a look at late orders
    after a quiet spell (nobody watching, a `shop doctor` from cron) finds a few seconds'
    orders to settle rather than hours'."""
    while True:
        now = datetime.now(UTC)
        try:
            await settle_answered(commits, now, now - late_after)
        except Exception as exc:  # the database is away: the next round or a look settles
            log.warning("could not settle answered orders", error=str(exc)[:500])
        await asyncio.sleep(every)  # a period, not a wait for something
