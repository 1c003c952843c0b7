"""The kit's tables on SQLite and PostgreSQL: outbox and relay order, inbox, retention, times."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from common.events import (
    EVENT_TYPES,
    DeliveryReceipt,
    DeliveryReceipts,
    Event,
    ReservedLine,
    StockReserved,
)
from common.kit.broker import Publisher, UnroutableError
from common.kit.commit import GroupCommit
from common.kit.db import UTCDateTime, create_tables, make_engine
from common.kit.outbox import (
    KIT_LATER_INDEXES,
    Relay,
    add_to_outbox,
    claim,
    inbox,
    kit_metadata,
    outbox,
    remember,
    seen,
    utcnow,
)
from tests.integration.support import wait_for
from tests.storage import backend_pid, index_names, someone_waits_for

pytestmark = pytest.mark.integration

QUEUE = "inventory.order.placed"


class RecordingPublisher(Publisher):
    """A publisher without a broker: records what the relay hands it, refuses chosen events."""

    def __init__(self) -> None:  # no connection, no topology: nothing reaches a broker
        self.published: list[tuple[Event, bytes | None]] = []
        self.refused: set[uuid.UUID] = set()

    async def publish(self, event: Event, *, body: bytes | None = None, **_: Any) -> None:
        if event.event_id in self.refused:
            raise UnroutableError(f"no queue is bound for {event.event_type} (test refusal)")
        self.published.append((event, body))

    async def publish_stored(self, body: str, trace_parent: Any = None) -> None:
        cls = EVENT_TYPES[json.loads(body)["event_type"]]
        await self.publish(cls.model_validate_json(body), body=body.encode())

    def ids(self, order_id: uuid.UUID | None = None) -> list[uuid.UUID]:
        """Event ids in publish order, of one order or of all."""
        return [e.event_id for e, _ in self.published
                if order_id is None or e.correlation_id == str(order_id)]


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(db_url)
    await create_tables(eng, kit_metadata)
    yield eng
    await eng.dispose()


@pytest.fixture
async def pg_engine(postgres_db_url: str) -> AsyncIterator[AsyncEngine]:
    """For what only PostgreSQL has: row locks between concurrent writers, schemas."""
    eng = make_engine(postgres_db_url)
    await create_tables(eng, kit_metadata)
    yield eng
    await eng.dispose()


def reserved(order_id: uuid.UUID, n: int) -> StockReserved:
    """The n-th event of an order's flow (n tells them apart)."""
    return StockReserved(order_id=order_id, correlation_id=str(order_id),
                         lines=(ReservedLine(sku=f"SKU-{n}", quantity=n),))


async def commit(engine: AsyncEngine, events: Sequence[Event]) -> None:
    """What the runtime does with a handler's events: one transaction into the outbox."""
    async with engine.begin() as conn:
        await add_to_outbox(conn, events)


def relay_for(engine: AsyncEngine, publisher: Publisher, **options: Any) -> Relay:
    return Relay(engine, publisher, commits=GroupCommit(engine, asyncio.Lock()), **options)


async def outbox_rows(engine: AsyncEngine) -> dict[str, sa.Row[Any]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(outbox))).all()
    return {row.event_id: row for row in rows}


# --- outbox and relay -------------------------------------------------------------------------


async def test_the_relay_publishes_each_orders_events_in_commit_order_once(
        engine: AsyncEngine) -> None:
    """Events of one order go out in the order they were committed, across transactions;
    every row is marked sent with its own body, and a second pass publishes nothing."""
    order_a, order_b = uuid.uuid4(), uuid.uuid4()
    a = [reserved(order_a, n) for n in range(1, 6)]
    b = [reserved(order_b, n) for n in range(1, 4)]
    await commit(engine, [a[0], b[0], a[1]])
    await commit(engine, [b[1], a[2]])
    await commit(engine, [a[3], a[4], b[2]])
    publisher = RecordingPublisher()
    relay = relay_for(engine, publisher)

    assert await relay.flush_once() == (8, 0)
    assert publisher.ids(order_a) == [e.event_id for e in a]
    assert publisher.ids(order_b) == [e.event_id for e in b]
    for event, body in publisher.published:
        assert body is not None
        assert StockReserved.model_validate_json(body) == event
    rows = await outbox_rows(engine)
    assert len(rows) == 8
    assert all(row.sent_at is not None and row.sent_at.tzinfo is not None
               for row in rows.values())
    assert await relay.flush_once() == (0, 0)
    assert len(publisher.published) == 8


async def test_receipts_of_several_commits_go_out_as_one_message(engine: AsyncEngine) -> None:
    """The relay finds three transactions' receipts at once: one DeliveryReceipts carries
    all three (the events beside them go out as they are), and every row is marked sent."""
    orders = [uuid.uuid4() for _ in range(3)]
    for order_id in orders:
        event = reserved(order_id, 1)
        await commit(engine, [event, DeliveryReceipt(
            subscriber="inventory", queue="inventory.order.placed",
            handled_event_id=str(uuid.uuid4()), handled_event_type="OrderPlaced",
            outcome="handled", received_at=utcnow(), duration_ms=1.0,
            correlation_id=str(order_id))])
    publisher = RecordingPublisher()

    assert await relay_for(engine, publisher, service="inventory").flush_once() == (6, 0)
    kinds = sorted(type(e).__name__ for e, _ in publisher.published)
    assert kinds == ["DeliveryReceipts", "StockReserved", "StockReserved", "StockReserved"]
    batch = next(e for e, _ in publisher.published if isinstance(e, DeliveryReceipts))
    assert sorted(r.correlation_id or "" for r in batch.receipts) == sorted(map(str, orders))
    assert (batch.subscriber, batch.queue) == ("inventory", "inventory.order.placed")
    assert all(row.sent_at is not None for row in (await outbox_rows(engine)).values())


async def test_a_row_that_fails_holds_up_only_its_own_order(engine: AsyncEngine) -> None:
    """A refused publish keeps its row (attempts, error, a later retry time) and the rows of
    the same order behind it; other orders go out. Once accepted, the held order follows
    in its commit order."""
    order_a, order_b = uuid.uuid4(), uuid.uuid4()
    a1, a2, b1 = reserved(order_a, 1), reserved(order_a, 2), reserved(order_b, 1)
    await commit(engine, [a1, b1, a2])
    publisher = RecordingPublisher()
    publisher.refused.add(a1.event_id)
    relay = relay_for(engine, publisher)

    assert await relay.flush_once() == (1, 1)
    assert publisher.ids() == [b1.event_id]
    rows = await outbox_rows(engine)
    stuck = rows[str(a1.event_id)]
    assert stuck.sent_at is None
    assert stuck.attempts == 1
    assert "test refusal" in stuck.last_error
    assert stuck.next_attempt_at > stuck.created_at
    assert rows[str(a2.event_id)].sent_at is None

    publisher.refused.clear()

    async def order_a_out() -> bool:
        await relay.flush_once()
        return len(publisher.ids(order_a)) == 2

    await wait_for(order_a_out, timeout=10, what="order A's rows after their backoff")
    assert publisher.ids(order_a) == [a1.event_id, a2.event_id]
    assert all(row.sent_at is not None for row in (await outbox_rows(engine)).values())


# --- inbox ------------------------------------------------------------------------------------


async def test_the_inbox_remembers_an_event_per_queue(engine: AsyncEngine) -> None:
    """A handled event is seen afterwards on its queue only; recording it twice on the same
    queue violates the key, which the runner takes as "a competing delivery won"."""
    event_id = str(uuid.uuid4())
    async with engine.begin() as conn:
        assert not await seen(conn, QUEUE, event_id)
        await remember(conn, QUEUE, event_id)
    async with engine.connect() as conn:
        assert await seen(conn, QUEUE, event_id)
        assert not await seen(conn, "seller.order.placed", event_id)
        assert not await seen(conn, QUEUE, str(uuid.uuid4()))
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await remember(conn, QUEUE, event_id)
    async with engine.begin() as conn:
        await remember(conn, "seller.order.placed", event_id)  # another queue: its own record


async def test_an_inbox_record_rolled_back_with_its_effect_is_forgotten(
        engine: AsyncEngine) -> None:
    """The record is part of the delivery's transaction: a failed handler leaves no trace,
    so the retry is not mistaken for a duplicate."""
    event_id = str(uuid.uuid4())

    async def failing_delivery() -> None:
        async with engine.begin() as conn:
            await remember(conn, QUEUE, event_id)
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        await failing_delivery()
    async with engine.connect() as conn:
        assert not await seen(conn, QUEUE, event_id)


async def test_two_replicas_recording_one_event_at_once_let_one_win(
        pg_engine: AsyncEngine) -> None:
    """PostgreSQL: the second replica's insert waits for the first one's transaction, then
    fails on the key once that commits: one effect, the other delivery a duplicate.

    SQLite needs no such test: a service serialises its writers (one file, one writer).
    """
    engine = pg_engine
    event_id = str(uuid.uuid4())

    async def second_replica() -> None:
        async with engine.begin() as conn:
            await remember(conn, QUEUE, event_id)

    async with engine.connect() as first:
        await remember(first, QUEUE, event_id)
        pid = await backend_pid(first)
        racing = asyncio.create_task(second_replica())
        await wait_for(lambda: someone_waits_for(engine, pid),
                       what="the second insert to wait for the first")
        await first.commit()
    with pytest.raises(IntegrityError):
        await racing
    async with engine.connect() as conn:
        count = await conn.scalar(sa.select(sa.func.count()).select_from(inbox)
                                  .where(inbox.c.event_id == event_id))
    assert count == 1


async def test_a_batch_claims_only_the_events_not_handled_before(engine: AsyncEngine) -> None:
    """`claim` records a batch's event ids in one statement and returns the new ones: an id
    handled before, or twice in the batch, is claimed once."""
    old, new = str(uuid.uuid4()), str(uuid.uuid4())
    async with engine.begin() as conn:
        await remember(conn, QUEUE, old)
    async with engine.begin() as conn:
        assert await claim(conn, QUEUE, [old, new, new]) == {new}
        assert await claim(conn, "seller.order.placed", [old]) == {old}  # its own records
        assert await claim(conn, QUEUE, []) == set()
    async with engine.connect() as conn:
        assert await seen(conn, QUEUE, new)


async def test_a_replica_claiming_an_event_another_holds_waits_then_sees_a_duplicate(
        pg_engine: AsyncEngine) -> None:
    """PostgreSQL: a batch claiming an event another replica claimed but has not committed
    waits for that commit, then leaves it out (a duplicate), instead of failing the batch."""
    engine = pg_engine
    event_id, other = str(uuid.uuid4()), str(uuid.uuid4())

    async def second_replica() -> set[str]:
        async with engine.begin() as conn:
            return await claim(conn, QUEUE, [other, event_id])

    async with engine.connect() as first:
        assert await claim(first, QUEUE, [event_id]) == {event_id}
        pid = await backend_pid(first)
        racing = asyncio.create_task(second_replica())
        await wait_for(lambda: someone_waits_for(engine, pid),
                       what="the second claim to wait for the first")
        await first.commit()
    assert await racing == {other}


# --- retention --------------------------------------------------------------------------------


async def test_retention_removes_old_sent_rows_and_old_inbox_records_only(
        engine: AsyncEngine) -> None:
    """Sent outbox rows and inbox records older than the retention go; recent ones stay,
    and an unsent row stays whatever its age (it has yet to go out)."""
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=8), now - timedelta(days=6)
    order_id = uuid.uuid4()
    sent_long_ago, sent_lately, never_sent = (reserved(order_id, n) for n in range(1, 4))
    await commit(engine, [sent_long_ago, sent_lately, never_sent])
    async with engine.begin() as conn:
        for event, sent_at in ((sent_long_ago, old), (sent_lately, recent), (never_sent, None)):
            await conn.execute(outbox.update().where(outbox.c.event_id == str(event.event_id))
                               .values(created_at=old, sent_at=sent_at))
        await conn.execute(inbox.insert(), [
            {"queue": QUEUE, "event_id": "handled-long-ago", "handled_at": old},
            {"queue": QUEUE, "event_id": "handled-lately", "handled_at": recent},
        ])

    # The relay runs this once a minute; called directly so the test need not wait for it.
    await relay_for(engine, RecordingPublisher(), retention=timedelta(days=7)).cleanup()

    assert set(await outbox_rows(engine)) == {str(sent_lately.event_id),
                                               str(never_sent.event_id)}
    async with engine.connect() as conn:
        kept = set((await conn.execute(sa.select(inbox.c.event_id))).scalars())
        assert kept == {"handled-lately"}
        assert not await seen(conn, QUEUE, "handled-long-ago")


async def test_an_older_inbox_gets_the_index_its_cleanup_reads(db_url: str) -> None:
    """An inbox from before the handled_at index (the cleanup read the whole table every
    minute): creating the tables adds it, twice is harmless, and the inbox works as before."""
    old = sa.MetaData()
    sa.Table("kit_inbox", old,
             sa.Column("queue", sa.String(255), primary_key=True),
             sa.Column("event_id", sa.String(36), primary_key=True),
             sa.Column("handled_at", UTCDateTime(), nullable=False))
    eng = make_engine(db_url)
    try:
        await create_tables(eng, old)
        async with eng.connect() as conn:
            assert "ix_kit_inbox_handled_at" not in await index_names(conn, "kit_inbox")
        await create_tables(eng, kit_metadata, indexes=KIT_LATER_INDEXES)
        await create_tables(eng, kit_metadata, indexes=KIT_LATER_INDEXES)
        async with eng.begin() as conn:
            assert "ix_kit_inbox_handled_at" in await index_names(conn, "kit_inbox")
            assert await claim(conn, QUEUE, ["e1", "e2"]) == {"e1", "e2"}
            assert await claim(conn, QUEUE, ["e2", "e3"]) == {"e3"}
    finally:
        await eng.dispose()


# --- times ------------------------------------------------------------------------------------


times_metadata = sa.MetaData()
moments = sa.Table(
    "moments", times_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", UTCDateTime(), nullable=False),
)


async def test_times_are_stored_as_aware_utc_and_naive_ones_refused(
        engine: AsyncEngine) -> None:
    """A time in any zone reads back as the same instant in UTC, microseconds intact, and
    compares correctly in SQL; a naive time is refused before it reaches the database."""
    await create_tables(engine, times_metadata)
    berlin = datetime(2025, 3, 30, 3, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    earlier_in_utc = datetime(2025, 3, 30, 1, 0, tzinfo=UTC)
    async with engine.begin() as conn:
        await conn.execute(moments.insert(), [{"id": 1, "at": berlin},
                                              {"id": 2, "at": earlier_in_utc}])
    async with engine.connect() as conn:
        back = await conn.scalar(sa.select(moments.c.at).where(moments.c.id == 1))
        later = list((await conn.execute(sa.select(moments.c.id).where(
            moments.c.at > datetime(2025, 3, 30, 1, 15, tzinfo=UTC)))).scalars())
    assert back == berlin
    assert back is not None
    assert back.utcoffset() == timedelta(0)
    assert back.microsecond == 123456
    assert later == [1]
    with pytest.raises(StatementError, match="naive datetime"):
        async with engine.begin() as conn:
            await conn.execute(moments.insert().values(id=3, at=datetime(2025, 1, 1)))


# --- the PostgreSQL URL -----------------------------------------------------------------------


async def test_a_search_path_in_the_url_keeps_the_tables_in_that_schema(
        pg_engine: AsyncEngine, postgres_db_url: str) -> None:
    """PostgreSQL: `?search_path=<schema>` makes the engine's sessions use that schema, so
    the kit's tables are created there and nowhere else."""
    schema = make_url(postgres_db_url).query["search_path"]
    assert isinstance(schema, str)
    async with pg_engine.connect() as conn:
        assert await conn.scalar(sa.text("SELECT current_schema()")) == schema
        where = (await conn.execute(sa.text(
            "SELECT table_schema FROM information_schema.tables "
            "WHERE table_name = 'kit_outbox'"))).scalars().all()
    assert schema in where
    assert "public" not in where
