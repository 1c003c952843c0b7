"""The kit's own tables: the outbox of events to publish and the inbox of events handled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.broker import Publisher
from common.db import UTCDateTime
from common.events import EVENT_TYPES, Event
from common.logging import get_logger

log = get_logger(__name__)

kit_metadata = MetaData()

outbox = Table(
    "kit_outbox", kit_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime(), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Index("ix_kit_outbox_unsent", "sent_at", "id"),
)

#: Event ids a subscriber handled, committed with the effect: a redelivery finds its row.
inbox = Table(
    "kit_inbox", kit_metadata,
    Column("queue", String(200), primary_key=True),
    Column("event_id", String(36), primary_key=True),
    Column("handled_at", UTCDateTime(), nullable=False),
)


def utcnow() -> datetime:
    return datetime.now(UTC)


async def add_to_outbox(conn: AsyncConnection, events: Sequence[Event]) -> None:
    """Store events in the caller's transaction; the relay publishes them after commit."""
    if not events:
        return
    now = utcnow()
    await conn.execute(insert(outbox), [
        {"event_id": str(e.event_id), "event_type": e.event_type,
         "body": e.model_dump_json(), "created_at": now, "attempts": 0}
        for e in events
    ])


async def seen(conn: AsyncConnection, queue: str, event_id: str) -> bool:
    row = await conn.execute(
        select(inbox.c.event_id).where(inbox.c.queue == queue, inbox.c.event_id == event_id))
    return row.first() is not None


async def remember(conn: AsyncConnection, queue: str, event_id: str) -> None:
    await conn.execute(insert(inbox).values(queue=queue, event_id=event_id, handled_at=utcnow()))


class Relay:
    """Publishes committed outbox rows with confirms, oldest first; retries with backoff.

    Woken by every commit that adds rows, and polls now and then for rows another process
    (the CLI, a crashed predecessor) left behind.
    """

    def __init__(self, engine: AsyncEngine, publisher: Publisher, *,
                 write_lock: asyncio.Lock, batch: int = 256, poll_interval: float = 1.0,
                 retention: timedelta = timedelta(days=1)) -> None:
        self._engine = engine
        self._publisher = publisher
        self._write_lock = write_lock
        self._batch = batch
        self._poll_interval = poll_interval
        self._retention = retention
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def wake(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        delay = 0.2
        last_cleanup = 0.0
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            try:
                sent = await self.flush_once()
            except Exception as exc:  # a broker or database outage: keep the rows, retry
                log.warning("outbox relay could not publish; retrying", error=str(exc),
                            error_type=type(exc).__name__, retry_in=round(delay, 2))
                await self._wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.2
            if sent:
                continue  # there may be more behind this batch
            self._idle.set()
            if loop.time() - last_cleanup > 60:
                last_cleanup = loop.time()
                await self._cleanup()
            await self._wait(self._poll_interval)

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def flush_once(self) -> int:
        """Publish one batch of unsent rows; returns how many were sent."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(
                select(outbox.c.id, outbox.c.event_type, outbox.c.body)
                .where(outbox.c.sent_at.is_(None)).order_by(outbox.c.id).limit(self._batch)
            )).all()
        if not rows:
            return 0

        # Publish the whole batch in flight at once (confirms arrive concurrently) rather than
        # awaiting each confirm in turn; frames still leave in id order on one channel.
        results = await asyncio.gather(*(
            self._publisher.publish(EVENT_TYPES[r.event_type].model_validate_json(r.body),
                                    body=r.body.encode())
            for r in rows
        ), return_exceptions=True)
        sent_ids = [r.id for r, res in zip(rows, results, strict=True)
                    if not isinstance(res, BaseException)]
        failed = [res for res in results if isinstance(res, BaseException)]
        if sent_ids:
            async with self._write_lock, self._engine.begin() as conn:
                await conn.execute(update(outbox).where(outbox.c.id.in_(sent_ids))
                                   .values(sent_at=utcnow()))
        if failed:
            raise failed[0]
        return len(sent_ids)

    async def wait_idle(self, seconds: float) -> bool:
        """Wait until every row committed so far is published (or `seconds` pass)."""
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _cleanup(self) -> None:
        cutoff = utcnow() - self._retention
        try:
            async with self._write_lock, self._engine.begin() as conn:
                await conn.execute(delete(outbox).where(outbox.c.sent_at < cutoff))
                await conn.execute(delete(inbox).where(inbox.c.handled_at < cutoff))
        except SQLAlchemyError as exc:
            log.warning("outbox cleanup failed", error=str(exc))
