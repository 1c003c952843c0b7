"""The kit's own tables: the outbox of events to publish and the inbox of events handled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.events import (
    EVENT_TYPES,
    DeliveryReceipt,
    DeliveryReceipts,
    Event,
    receipts_of,
)
from common.kit.broker import Publisher
from common.kit.commit import GroupCommit
from common.kit.db import UTCDateTime
from common.kit.logging import get_logger
from common.kit.telemetry import OUTBOX_AGE, OUTBOX_BACKLOG, current_trace_headers

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
    #: Events of one key (the order) are published in the order they were committed.
    Column("partition_key", String(128), nullable=False),
    #: A row that failed waits until then, without holding up other keys.
    Column("next_attempt_at", UTCDateTime(), nullable=True),
    Column("last_error", Text, nullable=True),
    #: The trace context the event was produced in (W3C headers as JSON), for its publish.
    Column("trace_context", Text, nullable=True),
    #: The process that committed the row: its relay publishes it at once; any relay takes
    #: over a row left unsent past the orphan age (its process died).
    Column("instance", String(255), nullable=True),
    Index("ix_kit_outbox_unsent", "sent_at", "id"),
)

#: Event ids a subscriber handled, committed with the effect: a redelivery finds its row.
inbox = Table(
    "kit_inbox", kit_metadata,
    Column("queue", String(255), primary_key=True),
    Column("event_id", String(36), primary_key=True),
    Column("handled_at", UTCDateTime(), nullable=False),
)
#: For the cleanup's range: without it, deleting what is past the retention read the whole
#: table every minute (60 ms over the 440,000 rows 100,000 orders leave in the order
#: service, on its event loop).
_INBOX_BY_TIME = Index("ix_kit_inbox_handled_at", inbox.c.handled_at)

#: Indexes the kit's tables got after they first shipped (see `create_tables`).
KIT_LATER_INDEXES = (_INBOX_BY_TIME,)


def utcnow() -> datetime:
    return datetime.now(UTC)


# The relay's statements, built once: a statement built per call costs SQLAlchemy more than
# SQLite takes to run it.
_UNSENT_COLUMNS = (outbox.c.id, outbox.c.event_type, outbox.c.body, outbox.c.attempts,
                   outbox.c.partition_key, outbox.c.trace_context, outbox.c.next_attempt_at)
_UNSENT_ALL = (select(*_UNSENT_COLUMNS).where(outbox.c.sent_at.is_(None))
               .order_by(outbox.c.id).limit(bindparam("limit")))
#: Replicas sharing one database each publish their own rows, so an event goes out once; a
#: row whose process died is taken over by any relay after the orphan age (two relays
#: taking the same orphan publish it twice: consumers dedupe it).
_UNSENT_MINE_OR_ORPHANED = (
    select(*_UNSENT_COLUMNS)
    .where(outbox.c.sent_at.is_(None),
           or_(outbox.c.instance == bindparam("instance"), outbox.c.instance.is_(None),
               outbox.c.created_at < bindparam("orphaned_before")))
    .order_by(outbox.c.id).limit(bindparam("limit")))
_MARK_SENT = (update(outbox).where(outbox.c.id.in_(bindparam("ids", expanding=True)))
              .values(sent_at=bindparam("now")))
_MARK_FAILED = (update(outbox).where(outbox.c.id == bindparam("row_id"))
                .values(attempts=bindparam("attempts"), last_error=bindparam("error"),
                        next_attempt_at=bindparam("retry_at")))
_INSERT_OUTBOX = insert(outbox)
_RECEIPT_TYPES = frozenset({"DeliveryReceipt", "DeliveryReceipts"})
_INSERT_INBOX = insert(inbox)
_SEEN = select(inbox.c.event_id).where(inbox.c.queue == bindparam("queue"),
                                       inbox.c.event_id == bindparam("event_id"))


async def add_to_outbox(conn: AsyncConnection, events: Sequence[Event],
                        instance: str | None = None,
                        traces: Mapping[uuid.UUID, str] | None = None) -> None:
    """Store events in the caller's transaction; the relay publishes them after commit.

    Each event keeps the trace context it was produced in: its entry in `traces`, else the
    current one.
    """
    if not events:
        return
    now = utcnow()
    trace_headers = current_trace_headers()
    trace_context = json.dumps(trace_headers) if trace_headers else None
    traces = traces or {}
    await conn.execute(_INSERT_OUTBOX, [
        {"event_id": str(e.event_id), "event_type": e.event_type,
         "body": e.model_dump_json(), "created_at": now, "attempts": 0,
         "partition_key": e.correlation_id or str(e.event_id),
         "trace_context": traces.get(e.event_id, trace_context), "instance": instance}
        for e in events
    ])


async def seen(conn: AsyncConnection, queue: str, event_id: str) -> bool:
    row = await conn.execute(_SEEN, {"queue": queue, "event_id": event_id})
    return row.first() is not None


async def remember(conn: AsyncConnection, queue: str, event_id: str) -> None:
    await conn.execute(_INSERT_INBOX,
                       {"queue": queue, "event_id": event_id, "handled_at": utcnow()})


async def claim(conn: AsyncConnection, queue: str, event_ids: Sequence[str]) -> set[str]:
    """Record `event_ids` as handled by this queue's subscriber, in the caller's transaction;
    returns those not recorded before (the others are duplicates). One statement.

    The insert comes before the handlers run, as `remember` does: on PostgreSQL a replica
    claiming an event another replica has claimed but not yet committed waits for that
    commit, then sees a duplicate instead of doing the work twice.
    """
    if not event_ids:
        return set()
    rows = [{"queue": queue, "event_id": event_id, "handled_at": utcnow()}
            for event_id in dict.fromkeys(event_ids)]
    upsert = _CLAIMS.get(conn.dialect.name)
    if upsert is None:  # a database without ON CONFLICT: two statements
        known = set((await conn.execute(select(inbox.c.event_id).where(
            inbox.c.queue == queue, inbox.c.event_id.in_(event_ids)))).scalars())
        fresh = [r for r in rows if r["event_id"] not in known]
        if fresh:
            await conn.execute(insert(inbox), fresh)
        return {str(r["event_id"]) for r in fresh}
    return set((await conn.execute(upsert, rows)).scalars())


#: INSERT ... ON CONFLICT DO NOTHING RETURNING event_id, per dialect: the new claims only.
_CLAIMS = {
    "sqlite": sqlite_insert(inbox).on_conflict_do_nothing().returning(inbox.c.event_id),
    "postgresql": postgresql_insert(inbox).on_conflict_do_nothing().returning(
        inbox.c.event_id),
}


#: Flushes the relay runs at once (each up to `batch` rows, awaiting its confirms).
_MAX_FLUSHES = 4

#: Receipts messages stay far below the smallest SHOP_MAX_MESSAGE_BYTES (512 KiB), or the
#: tracker would park them as poison: a batch's receipts (about 600 bytes each) go out in
#: messages of at most this many, and the relay merges stored receipts rows into one
#: message only up to `_RECEIPTS_MESSAGE_BYTES` of them.
RECEIPTS_PER_MESSAGE = 256
_RECEIPTS_MESSAGE_BYTES = 256 * 1024


@dataclass
class _Batch:
    """The rows one flush publishes: by key, in commit order; receipts apart."""

    by_key: dict[str, list[Any]] = field(default_factory=dict)
    receipts: list[Any] = field(default_factory=list)
    ids: set[int] = field(default_factory=set)
    #: It took as many rows as a flush may: more may be due behind them.
    full: bool = False


@dataclass
class _Receipts:
    """One receipts message the relay makes of stored rows: their receipts of one queue."""

    receipts: list[DeliveryReceipt] = field(default_factory=list)
    rows: list[Any] = field(default_factory=list)
    #: The stored size of those rows, which the message's body roughly equals.
    size: int = 0

    def add(self, row: Any, receipts: Sequence[DeliveryReceipt]) -> None:
        self.receipts.extend(receipts)
        self.rows.append(row)
        self.size += len(row.body)


class Relay:
    """Publishes committed outbox rows with confirms; retries each failed row with backoff.

    Woken by every commit that adds rows, and polls now and then for rows another process
    (a crashed predecessor) left behind. Rows of one partition key (the order) go out in
    commit order, one confirm at a time; different keys go out concurrently, so a batch has
    many publishes in flight. A row that fails (broker away, nobody bound) waits with its own
    backoff and holds up only the rows of its key behind it.
    """

    def __init__(self, engine: AsyncEngine, publisher: Publisher, *,
                 commits: GroupCommit, batch: int = 256, poll_interval: float = 1.0,
                 retention: timedelta = timedelta(days=7), max_backoff: float = 30.0,
                 service: str = "shop", instance: str | None = None,
                 orphan_after: timedelta = timedelta(seconds=15)) -> None:
        self._service = service
        self._instance = instance
        self._orphan_after = orphan_after
        self._engine = engine
        self._publisher = publisher
        #: The service's writers' turn-taking: marking rows sent shares their commits.
        self._commits = commits
        self._batch = batch
        self._poll_interval = poll_interval
        self._retention = retention
        self._max_backoff = max_backoff
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        #: Rows and keys a flush has taken and not finished with.
        self._in_flight: set[int] = set()
        self._busy_keys: set[str] = set()
        self._failed_recently = False

    def wake(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """Publish rows as they are committed, until cancelled.

        A flush does not wait for the confirms of the one before: up to `_MAX_FLUSHES`
        run at once, so a row committed while earlier rows await their confirms goes out at
        once instead of after them. A key (an order) with rows in flight is left to the
        flush that has them, which keeps its rows in commit order. Under load the flushes
        in flight are busy and rows gather for the next one: fewer, bigger flushes.
        """
        last_cleanup = last_gauge = 0.0
        loop = asyncio.get_running_loop()
        flushes: set[asyncio.Task[tuple[int, int]]] = set()
        try:
            while True:
                self._wake.clear()
                failed = self._failed_recently
                if len(flushes) < _MAX_FLUSHES:
                    try:
                        batch = await self._take_due()
                    except Exception as exc:  # the database is away: it keeps the rows
                        log.warning("outbox relay could not read its table; retrying",
                                    error=str(exc))
                        await self._wait(self._poll_interval)
                        continue
                    if batch is not None:
                        flush = asyncio.create_task(self._flush(batch))
                        flushes.add(flush)
                        flush.add_done_callback(flushes.discard)
                        flush.add_done_callback(self._flushed)
                        if batch.full:
                            continue  # more may be due behind it, for another flush
                    elif not flushes and not failed and not self._wake.is_set():
                        # Nothing in flight, nothing due, nothing committed since: all out.
                        self._idle.set()
                if loop.time() - last_gauge > 5:
                    last_gauge = loop.time()
                    await self._measure_backlog()
                if loop.time() - last_cleanup > 60:
                    last_cleanup = loop.time()
                    await self.cleanup()
                await self._wait(min(self._poll_interval, 0.2) if failed
                                 else self._poll_interval)
        finally:
            for flush in flushes:
                flush.cancel()

    def _flushed(self, flush: asyncio.Task[tuple[int, int]]) -> None:
        """A flush ended: its keys are free again; rows held behind them may go now."""
        if flush.cancelled():
            return
        if (exc := flush.exception()) is not None:
            # Marking failed (the database is away): the rows stay unsent and go out again
            # later; consumers dedupe the second copy.
            log.warning("outbox relay could not record a flush; its rows will be sent again",
                        error=str(exc) or type(exc).__name__)
            self._failed_recently = True
        else:
            self._failed_recently = flush.result()[1] > 0
        self.wake()

    async def _wait(self, seconds: float) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that arrives
        # as the event is set (CPython gh-86296), and the relay would never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def flush_once(self) -> tuple[int, int]:
        """Publish one batch of due rows and wait for it; returns (sent, failed)."""
        batch = await self._take_due()
        return await self._flush(batch) if batch is not None else (0, 0)

    async def _take_due(self) -> _Batch | None:
        """Claim (in memory) the due rows of keys no flush has in flight.

        One query reads the oldest unsent rows, due or not: a row still waiting out its
        backoff holds back the rows of its key behind it, and only those.
        """
        now = utcnow()
        limit = self._batch + len(self._in_flight)
        async with self._engine.connect() as conn:
            if self._instance is None:
                rows = (await conn.execute(_UNSENT_ALL, {"limit": limit})).all()
            else:
                rows = (await conn.execute(_UNSENT_MINE_OR_ORPHANED, {
                    "limit": limit, "instance": self._instance,
                    "orphaned_before": now - self._orphan_after})).all()
        batch = _Batch()
        held = set(self._busy_keys)
        taken = 0
        for row in rows:
            if row.id in self._in_flight or row.partition_key in held:
                continue
            if row.next_attempt_at is not None and row.next_attempt_at > now:
                held.add(row.partition_key)
                continue
            if taken >= self._batch:
                break
            taken += 1
            if row.event_type in _RECEIPT_TYPES:
                batch.receipts.append(row)  # no order to keep: the tracker takes any order
            else:
                batch.by_key.setdefault(row.partition_key, []).append(row)
        if not taken:
            return None
        batch.full = taken >= self._batch
        batch.ids = {row.id for rows in batch.by_key.values() for row in rows}
        batch.ids.update(row.id for row in batch.receipts)
        self._in_flight |= batch.ids
        self._busy_keys |= batch.by_key.keys()
        return batch

    async def _flush(self, batch: _Batch) -> tuple[int, int]:
        """Publish a batch, then mark its rows sent (or failed, with a backoff)."""
        try:
            outcomes = await asyncio.gather(
                *(self._publish_in_order(k) for k in batch.by_key.values()),
                self._publish_receipts(batch.receipts))
            sent_ids = [i for ids, _ in outcomes for i in ids]
            failures = [f for _, fs in outcomes for f in fs]

            async def mark(conn: AsyncConnection) -> None:
                if sent_ids:
                    await conn.execute(_MARK_SENT, {"ids": sent_ids, "now": utcnow()})
                if failures:
                    await conn.execute(_MARK_FAILED, [{
                        "row_id": row.id, "attempts": row.attempts + 1,
                        "error": f"{type(exc).__name__}: {exc}"[:2000],
                        "retry_at": utcnow() + timedelta(
                            seconds=min(0.2 * 2 ** row.attempts, self._max_backoff)),
                    } for row, exc in failures])

            await self._commits.run(mark)
        finally:
            self._in_flight -= batch.ids
            self._busy_keys -= batch.by_key.keys()
        if failures:
            row, exc = failures[0]
            log.warning("outbox relay could not publish; will retry", failed=len(failures),
                        sent=len(sent_ids), error=str(exc) or type(exc).__name__,
                        error_type=type(exc).__name__, first_event_type=row.event_type)
        return len(sent_ids), len(failures)

    async def _publish_in_order(self, rows: list[Any]
                                ) -> tuple[list[int], list[tuple[Any, BaseException]]]:
        """Publish one key's rows one after the other; stop at the first failure."""
        sent: list[int] = []
        for row in rows:
            try:
                await self._publisher.publish_stored(
                    row.body,
                    trace_parent=json.loads(row.trace_context) if row.trace_context else None)
            except Exception as exc:  # reported per row; the rows behind it wait their turn
                return sent, [(row, exc)]
            sent.append(row.id)
        return sent, []

    async def _publish_receipts(self, rows: list[Any]
                                ) -> tuple[list[int], list[tuple[Any, BaseException]]]:
        """Publish the receipts of several transactions as few messages per queue.

        Under load the relay finds several commits' receipts at once: one message each
        would cost the broker and the tracker as much as the events they report on. A
        message takes rows up to `_RECEIPTS_MESSAGE_BYTES`, so however many wait (after an
        outage, say), none grows past what the tracker reads.
        """
        if len(rows) <= 1:
            return await self._publish_in_order(rows)
        groups: dict[tuple[str, str], list[_Receipts]] = {}
        for row in rows:
            mine: dict[tuple[str, str], list[DeliveryReceipt]] = {}
            for receipt in receipts_of(EVENT_TYPES[row.event_type].model_validate_json(row.body)):
                mine.setdefault((receipt.subscriber, receipt.queue), []).append(receipt)
            for key, receipts in mine.items():
                messages = groups.setdefault(key, [])
                if not messages or messages[-1].size + len(row.body) > _RECEIPTS_MESSAGE_BYTES:
                    messages.append(_Receipts())
                messages[-1].add(row, receipts)
        sent: list[int] = []
        failures: list[tuple[Any, BaseException]] = []
        for (subscriber, queue), messages in groups.items():
            for message in messages:
                event = DeliveryReceipts(subscriber=subscriber, queue=queue,
                                         receipts=tuple(message.receipts),
                                         producer=self._service)
                try:
                    await self._publisher.publish(event)
                except Exception as exc:  # each row it came from waits out a backoff
                    failures.extend((row, exc) for row in message.rows)
                else:
                    sent.extend(row.id for row in message.rows)
        # A row whose receipts span two messages is sent only when both went out.
        failed = {row.id for row, _ in failures}
        return [i for i in dict.fromkeys(sent) if i not in failed], failures

    async def wait_idle(self, seconds: float) -> bool:
        """Wait until every row committed so far is published (or `seconds` pass)."""
        try:
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def _measure_backlog(self) -> None:
        """Set the backlog gauges; one small query every few seconds, only when idle or
        failing (a busy relay is by definition not idle for long)."""
        try:
            async with self._engine.connect() as conn:
                row = (await conn.execute(
                    select(func.count(), func.min(outbox.c.created_at))
                    .where(outbox.c.sent_at.is_(None)))).one()
        except SQLAlchemyError:
            return
        count, oldest = row
        OUTBOX_BACKLOG.labels(self._service).set(count or 0)
        OUTBOX_AGE.labels(self._service).set(
            (utcnow() - oldest).total_seconds() if oldest is not None else 0)

    async def cleanup(self) -> None:
        """Delete sent rows and handled-event records older than the retention."""
        cutoff = utcnow() - self._retention
        try:

            async def delete_old(conn: AsyncConnection) -> None:
                await conn.execute(delete(outbox).where(outbox.c.sent_at < cutoff))
                await conn.execute(delete(inbox).where(inbox.c.handled_at < cutoff))

            await self._commits.run(delete_old)
        except SQLAlchemyError as exc:
            log.warning("outbox cleanup failed", error=str(exc))
