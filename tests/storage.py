"""Where the storage tests find PostgreSQL, and a schema of its own for each test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import NullPool, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
PROBE_TIMEOUT = 5.0  # seconds for one connection attempt while looking for PostgreSQL
#: Each test's schema starts with this, so a stray one left by a killed run is recognisable.
SCHEMA_PREFIX = "t_"

HOW_TO_GET_POSTGRES = """\
The storage tests also run on PostgreSQL (database `test`, user `postgres`). Any one of these:
  * start the local cluster: `pg_ctlcluster 15 main start` (Debian; `pg_lsclusters` lists them),
    then `createdb -h 127.0.0.1 -U postgres test` if the database is missing;
  * with Docker: `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust
    -e POSTGRES_DB=test postgres:16`;
  * point at one elsewhere: `export POSTGRES_URL=postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB`.
Outside CI (no CI variable) the PostgreSQL runs are skipped when none answers; in CI they fail."""


def postgres_url() -> str:
    """The database the PostgreSQL runs use: POSTGRES_URL, or the local `test` database."""
    return os.environ.get("POSTGRES_URL") or DEFAULT_POSTGRES_URL


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


async def _select_one(url: str) -> None:
    engine = create_async_engine(url, poolclass=NullPool,
                                 connect_args={"timeout": PROBE_TIMEOUT})
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()


def postgres_problem(url: str) -> str | None:
    """Why a connection to `url` does not open, or None when it does."""
    # On an event loop of its own in a worker thread, so it never touches the loops
    # pytest-asyncio creates for the tests.
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pool.submit(asyncio.run, _select_one(url)).result(timeout=PROBE_TIMEOUT * 3)
        except Exception as exc:  # any failure means "not usable"; the reason goes in the message
            return f"{type(exc).__name__}: {exc}"
    return None


def with_search_path(url: str, schema: str) -> str:
    """`url` with its tables in `schema` (make_engine turns the parameter into a setting)."""
    return (make_url(url).update_query_dict({"search_path": schema})
            .render_as_string(hide_password=False))


def sqlite_url(path: Path) -> str:
    """The URL of an SQLite file."""
    return f"sqlite+aiosqlite:///{path}"


@asynccontextmanager
async def postgres_schema(base_url: str) -> AsyncIterator[str]:
    """A fresh schema `t_<uuid>` in the database at `base_url`; yields a URL pointing at it.

    The schema and everything in it are dropped afterwards, so tests share the database
    without seeing each other's tables. Dispose of engines on the URL before leaving.
    """
    schema = f"{SCHEMA_PREFIX}{uuid.uuid4().hex}"
    admin = create_async_engine(base_url, poolclass=NullPool)
    try:
        async with admin.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            yield with_search_path(base_url, schema)
        finally:
            async with admin.begin() as conn:
                # A connection the test left in a transaction would hold locks; wait a
                # bounded time and say so instead of hanging the run.
                await conn.execute(text("SET LOCAL lock_timeout = '10s'"))
                await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        await admin.dispose()


async def backend_pid(conn: AsyncConnection) -> int:
    """The PostgreSQL backend serving `conn`, to see who waits for it."""
    return int(await conn.scalar(text("SELECT pg_backend_pid()")) or 0)


async def someone_waits_for(engine: AsyncEngine, pid: int) -> bool:
    """Whether another PostgreSQL backend is blocked by backend `pid` (a row lock, a key)."""
    async with engine.connect() as probe:
        blocked = await probe.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
            {"pid": pid})
    return bool(blocked)


async def index_names(conn: AsyncConnection, table: str) -> set[str]:
    """The names of the indexes `table` has in the database (migrations' tests)."""

    def read(sync: Any) -> set[str]:
        return {str(ix["name"]) for ix in inspect(sync).get_indexes(table)}

    return await conn.run_sync(read)
