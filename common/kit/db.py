"""A service's database from a URL: SQLite file by default, PostgreSQL when configured."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy import DateTime, Index, MetaData, TypeDecorator, event, text
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

S = TypeVar("S")
T = TypeVar("T")

#: PostgreSQL connections an engine keeps open, and how many more it may open at a peak. A
#: service runs one transaction per consumed queue at a time (a batch of deliveries),
#: beside the relay, the API and failed deliveries handled alone: 10 cover the usual load,
#: 20 more a burst, and a busy replica then waits up to `PG_POOL_TIMEOUT` seconds for a
#: connection instead of opening hundreds (PostgreSQL's default max_connections is 100,
#: shared by every replica).
PG_POOL_SIZE = 10
PG_MAX_OVERFLOW = 20
PG_POOL_TIMEOUT = 30.0
#: Reopen connections older than this, so a server or proxy idle cut never hits a live one.
PG_POOL_RECYCLE = 1800
#: Seconds to open one connection before the attempt counts as failed.
PG_CONNECT_TIMEOUT = 10.0
#: Any key serialises `create_all` between replicas starting at once (see create_tables).
_CREATE_TABLES_LOCK = 0x73686F70  # "shop"


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every database (SQLite would hand back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: store aware UTC datetimes only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class InlineSqliteConnection(aiosqlite.Connection):
    """aiosqlite, with each call run at once on the event loop instead of in its thread.

    aiosqlite hands every call (cursor, execute, fetch, close: three or four per statement)
    to a thread and back through the event loop: about 0.1 ms each, on a transaction whose
    statements take microseconds on a local file in WAL mode. Run inline, a delivery's
    transaction costs a tenth. The price is that the event loop waits while SQLite works:
    fine for the short statements of a service (WAL readers never wait for the writer),
    and the busy timeout is kept short so another process holding the write lock cannot
    stall the loop for long (the transaction fails instead and is retried like any other
    failure). aiosqlite's thread still runs for what SQLAlchemy hands it directly.
    """

    async def _execute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)


#: Seconds an inline SQLite connection waits for another process's write lock: a loop
#: stalled longer would miss more than latency targets.
INLINE_BUSY_TIMEOUT = 2.0


def make_engine(url: str, *, inline: bool = True) -> AsyncEngine:
    """An async engine for `url`; for SQLite, the folder is created and WAL switched on.

    SQLite runs inline on the event loop (`InlineSqliteConnection`) unless `inline` is
    false: one-off commands that may wait long for a lock keep aiosqlite's thread.

    For PostgreSQL (`postgresql+asyncpg://user@host:5432/db`; a bare `postgresql://` gets
    the asyncpg driver) the pool is bounded and checked before use, and a `search_path`
    query parameter (`...?search_path=inventory`) puts the service's tables in that schema,
    so several services or test runs can share one database.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return _postgres_engine(parsed)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    # The CLI writes to the same file while the service runs: wait for the lock instead of
    # failing at once.
    if inline:
        path = parsed.database or ":memory:"

        async def connect() -> aiosqlite.Connection:
            # check_same_thread off: SQLAlchemy still sends a few calls through the thread.
            return await InlineSqliteConnection(
                lambda: sqlite3.connect(path, timeout=INLINE_BUSY_TIMEOUT,
                                        check_same_thread=False),
                iter_chunk_size=64)

        engine = create_async_engine(url, async_creator=connect)
    else:
        engine = create_async_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        # WAL lets readers (CLI, API) run beside the writer; NORMAL is durable across a process
        # crash in WAL mode, which is the failure we guard against (not power loss).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
        # Let SQLAlchemy, not the driver, start transactions: the driver's legacy mode runs
        # SELECTs outside any transaction, so a read of several tables could mix two
        # commits (an order's outcome without its new state).
        # https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#serializable-isolation-savepoints-transactional-ddl
        dbapi_conn.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine


def _postgres_engine(url: URL) -> AsyncEngine:
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+asyncpg")
    server_settings: dict[str, str] = {}
    search_path = url.query.get("search_path")
    if search_path is not None:
        # asyncpg takes session settings as a dict, not as URL parameters: move it there.
        server_settings["search_path"] = (search_path if isinstance(search_path, str)
                                          else ",".join(search_path))
        url = url.difference_update_query(["search_path"])
    connect_args: dict[str, Any] = {"timeout": PG_CONNECT_TIMEOUT}
    if server_settings:
        connect_args["server_settings"] = server_settings
    return create_async_engine(
        url,
        pool_size=PG_POOL_SIZE,
        max_overflow=PG_MAX_OVERFLOW,
        pool_timeout=PG_POOL_TIMEOUT,
        pool_recycle=PG_POOL_RECYCLE,
        # A connection the server closed (restart, failover) is replaced, not handed out.
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


async def create_tables(engine: AsyncEngine, *metadatas: MetaData,
                        indexes: Sequence[Index] = ()) -> None:
    """Create whatever tables are missing, and `indexes` where missing (idempotent).

    `create_all` creates an index only with its table: `indexes` names those added to a
    table after it first shipped, for older databases.

    On PostgreSQL, replicas starting at once would both find a table missing and one
    CREATE would fail; a transaction-scoped advisory lock lets one create while the other
    waits, then finds the tables there.
    """

    def create_indexes(sync: Any) -> None:
        for index in indexes:
            index.create(sync, checkfirst=True)

    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": _CREATE_TABLES_LOCK})
        for metadata in metadatas:
            await conn.run_sync(metadata.create_all)
        await conn.run_sync(create_indexes)


def run_with_store(db_url: str, metadata: MetaData, store: Callable[[AsyncConnection], S],
                   work: Callable[[S], Awaitable[T]]) -> T:
    """Run `work` on `store` in one transaction on the database at `db_url`, from sync code.

    Creates the missing tables first and disposes of the engine afterwards: what a
    service's CLI command does with the service's own database.
    """

    async def main() -> T:
        engine = make_engine(db_url, inline=False)
        try:
            await create_tables(engine, metadata)
            async with engine.begin() as conn:
                return await work(store(conn))
        finally:
            await engine.dispose()

    return asyncio.run(main())
