"""A service's database from a URL: SQLite file by default, PostgreSQL when configured."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import DateTime, MetaData, TypeDecorator, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

S = TypeVar("S")
T = TypeVar("T")


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


def make_engine(url: str) -> AsyncEngine:
    """An async engine for `url`; for SQLite, the folder is created and WAL switched on."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    # The CLI writes to the same file while the service runs: wait for the lock instead of
    # failing at once.
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


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


async def create_tables(engine: AsyncEngine, *metadatas: MetaData) -> None:
    """Create whatever tables are missing (idempotent)."""
    async with engine.begin() as conn:
        for metadata in metadatas:
            await conn.run_sync(metadata.create_all)


def run_with_store(db_url: str, metadata: MetaData, store: Callable[[AsyncConnection], S],
                   work: Callable[[S], Awaitable[T]]) -> T:
    """Run `work` on `store` in one transaction on the database at `db_url`, from sync code.

    Creates the missing tables first and disposes of the engine afterwards: what a
    service's CLI command does with the service's own database.
    """

    async def main() -> T:
        engine = make_engine(db_url)
        try:
            await create_tables(engine, metadata)
            async with engine.begin() as conn:
                return await work(store(conn))
        finally:
            await engine.dispose()

    return asyncio.run(main())
