"""A service's database from a URL: SQLite file by default, PostgreSQL when configured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


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

    return engine


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


async def create_tables(engine: AsyncEngine, *metadatas: MetaData) -> None:
    """Create whatever tables are missing (idempotent)."""
    async with engine.begin() as conn:
        for metadata in metadatas:
            await conn.run_sync(metadata.create_all)
