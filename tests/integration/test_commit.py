"""Group commit on a real SQLite file: shared commits, own failures, the caller's context."""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.kit.commit import GroupCommit
from common.kit.db import create_tables, make_engine

pytestmark = pytest.mark.integration

metadata = sa.MetaData()
rows = sa.Table("rows", metadata, sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("seen", sa.String(64), nullable=True))

caller = contextvars.ContextVar("caller", default="nobody")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'commit.db'}")
    await create_tables(eng, metadata)
    yield eng
    await eng.dispose()


def count_commits(engine: AsyncEngine) -> list[int]:
    commits: list[int] = []
    event.listen(engine.sync_engine, "commit", lambda _conn: commits.append(1))
    return commits


def insert(row_id: int) -> Callable[[AsyncConnection], Coroutine[Any, Any, int]]:
    async def work(conn: AsyncConnection) -> int:
        await conn.execute(rows.insert().values(id=row_id, seen=caller.get()))
        return row_id
    return work


async def stored(engine: AsyncEngine) -> dict[int, str]:
    async with engine.connect() as conn:
        return {r.id: r.seen for r in await conn.execute(sa.select(rows))}


async def test_transactions_queued_together_share_a_commit(engine: AsyncEngine) -> None:
    commits = count_commits(engine)
    group = GroupCommit(engine, asyncio.Lock())
    results = await asyncio.gather(*(group.run(insert(i)) for i in range(50)))
    assert results == list(range(50))
    assert set(await stored(engine)) == set(range(50))
    # Fifty callers at once: a handful of commits, not fifty.
    assert 1 <= len(commits) <= 5, commits


async def test_a_lone_transaction_commits_at_once(engine: AsyncEngine) -> None:
    commits = count_commits(engine)
    group = GroupCommit(engine, asyncio.Lock())
    assert await group.run(insert(7)) == 7
    assert len(commits) == 1
    assert await stored(engine) == {7: "nobody"}


async def test_a_failing_transaction_fails_alone_and_the_rest_commit(engine: AsyncEngine
                                                                     ) -> None:
    group = GroupCommit(engine, asyncio.Lock())
    await group.run(insert(3))
    # Row 3 exists: its second insert fails, inside a group with nine others.
    outcomes = await asyncio.gather(*(group.run(insert(i)) for i in range(10)),
                                    return_exceptions=True)
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    assert failed == [3]
    assert isinstance(outcomes[3], IntegrityError)
    assert set(await stored(engine)) == set(range(10))


async def test_each_work_runs_in_its_callers_context(engine: AsyncEngine) -> None:
    group = GroupCommit(engine, asyncio.Lock())

    async def place(row_id: int) -> int:
        caller.set(f"caller-{row_id}")
        return await group.run(insert(row_id))

    await asyncio.gather(*(place(i) for i in range(20)))
    assert await stored(engine) == {i: f"caller-{i}" for i in range(20)}


async def test_postgresql_transactions_are_not_grouped(postgres_db_url: str) -> None:
    eng = make_engine(postgres_db_url)
    table = sa.Table(f"commit_{uuid.uuid4().hex[:12]}", sa.MetaData(), sa.Column("id", sa.Integer,
                                                                     primary_key=True))
    try:
        async with eng.begin() as conn:
            await conn.run_sync(table.create)
        commits = count_commits(eng)
        group = GroupCommit(eng, asyncio.Lock())

        def add(row_id: int) -> Callable[[AsyncConnection], Coroutine[Any, Any, None]]:
            async def work(conn: AsyncConnection) -> None:
                await conn.execute(table.insert().values(id=row_id))
            return work

        await asyncio.gather(*(group.run(add(i)) for i in range(5)))
        assert len(commits) == 5
    finally:
        async with eng.begin() as conn:
            await conn.run_sync(table.drop)
        await eng.dispose()


async def test_finish_waits_for_the_queued_transactions(engine: AsyncEngine) -> None:
    """At shutdown: what was queued before `finish` is committed when it returns, even if
    its callers gave up waiting."""
    group = GroupCommit(engine, asyncio.Lock())
    callers = [asyncio.create_task(group.run(insert(i))) for i in range(10)]
    await asyncio.sleep(0)  # the callers queue their work; the leader starts
    for caller in callers[5:]:
        caller.cancel()
    await group.finish()
    assert set(await stored(engine)) >= set(range(5))
    assert all(c.done() for c in callers)
