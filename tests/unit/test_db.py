"""A database URL to an engine: the PostgreSQL driver, pool bounds and schema parameter."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from common.kit.db import PG_POOL_SIZE, is_sqlite, make_engine

pytestmark = pytest.mark.unit


async def test_a_postgresql_url_gets_asyncpg_and_a_bounded_pool() -> None:
    """`postgresql://` (no driver named) runs on asyncpg, with the pool the module sets;
    making the engine opens no connection."""
    engine = make_engine("postgresql://shop:secret@db.example:5433/orders")
    try:
        assert engine.dialect.driver == "asyncpg"
        assert (engine.url.host, engine.url.port, engine.url.database) == (
            "db.example", 5433, "orders")
        assert engine.pool.size() == PG_POOL_SIZE  # type: ignore[attr-defined]
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_the_search_path_parameter_becomes_a_session_setting() -> None:
    """asyncpg would refuse `search_path` as a connect argument: it leaves the URL (to
    become a server setting), while the driver's own parameters stay."""
    engine = make_engine("postgresql+asyncpg://u@h/db?search_path=inventory"
                         "&prepared_statement_cache_size=50")
    try:
        _, kwargs = engine.dialect.create_connect_args(engine.url)
        assert "search_path" not in kwargs
        assert kwargs["prepared_statement_cache_size"] == 50
    finally:
        await engine.dispose()


async def test_an_sqlite_url_is_unchanged_and_its_folder_created(tmp_path: Path) -> None:
    """The default SQLite file: its folder is made, no pool bounds are imposed."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'nested' / 'svc.db'}")
    try:
        assert is_sqlite(engine)
        assert (tmp_path / "nested").is_dir()
    finally:
        await engine.dispose()


async def test_sqlite_statements_run_on_the_event_loops_thread(tmp_path: Path) -> None:
    """The service engine runs SQLite inline (no aiosqlite thread hop per call); the one-off
    engine of CLI commands keeps aiosqlite's thread. Guards the aiosqlite internals the
    inline connection relies on."""
    for inline, on_loop in ((True, True), (False, False)):
        threads = await _threads_running_statements(tmp_path / f"{inline}.db", inline)
        assert threads, "the statement did not run"
        assert (threads[0] == threading.get_ident()) is on_loop


async def _threads_running_statements(path: Path, inline: bool) -> list[int]:
    engine = make_engine(f"sqlite+aiosqlite:///{path}", inline=inline)
    threads: list[int] = []

    def thread_of() -> int:
        threads.append(threading.get_ident())
        return 0

    @event.listens_for(engine.sync_engine, "connect")
    def _register(dbapi_conn: Any, _record: Any) -> None:
        # A SQL function that says which thread runs the statement calling it.
        dbapi_conn.driver_connection._conn.create_function("thread_of", 0, thread_of)

    try:
        async with engine.begin() as conn:
            await conn.execute(text("SELECT thread_of()"))
    finally:
        await engine.dispose()
    return threads
