"""Group commit: transactions that wait for SQLite's one writer share one commit.

A service's transactions (an HTTP placement, a batch of deliveries from each queue, the
relay's bookkeeping) take turns at SQLite's single write lock anyway. Those that queue up
while the lock is busy are run one after the other in one transaction and committed
together: one commit, one outbox read and one flush for all of them instead of one each.
Under load this also makes the events leave in bursts, so the subscribers downstream find
several deliveries waiting and batch them in turn. At a trickle a group is one transaction
and nothing waits for it to fill: the leader only lets already-runnable callers join
(a few turns of the event loop, no timer).

Each caller's work runs in a task of its own context (logging context, trace context), so
it behaves as if it ran in the caller. If any work of a group fails, nothing of the group
was committed and each work is run again in a transaction of its own: a failure is only
its own caller's, with its own exception. Works must therefore be safe to run again, as
they already are for a transaction that fails and is retried.

PostgreSQL has real concurrent writers: transactions there run as they come, each on its
own connection, as before.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import Histogram
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.kit.db import is_sqlite

T = TypeVar("T")

#: Transactions at most in one group: bounds the time the write lock is held at once.
MAX_GROUP = 64
#: Loop turns without a newcomer after which the leader stops waiting for the group to
#: grow (a caller takes a few turns from its socket read to its transaction).
_IDLE_TURNS = 3

COMMIT_GROUP = Histogram(
    "shop_commit_group_transactions", "Transactions committed together in one group commit.",
    ["service"], buckets=(1, 2, 4, 8, 16, 32, 64))


@dataclass(eq=False)
class _Waiting(Generic[T]):
    work: Callable[[AsyncConnection], Coroutine[Any, Any, T]]
    context: contextvars.Context
    future: asyncio.Future[T]


class GroupCommit:
    """Runs `work(conn)` in a transaction, sharing its commit with works queued beside it."""

    def __init__(self, engine: AsyncEngine, write_lock: Any, *, service: str = "shop",
                 max_group: int = MAX_GROUP) -> None:
        self._engine = engine
        self._write_lock = write_lock
        self._grouping = is_sqlite(engine)
        self._max_group = max_group
        self._queue: list[_Waiting[Any]] = []
        self._leader: asyncio.Task[None] | None = None
        self._sizes = COMMIT_GROUP.labels(service)

    async def run(self, work: Callable[[AsyncConnection], Coroutine[Any, Any, T]]) -> T:
        """Run `work` in a transaction and return its result once that is committed."""
        if not self._grouping:
            async with self._write_lock, self._engine.begin() as conn:
                return await work(conn)
        waiting: _Waiting[T] = _Waiting(work, contextvars.copy_context(),
                                        asyncio.get_running_loop().create_future())
        self._queue.append(waiting)
        if self._leader is None:
            self._leader = asyncio.create_task(self._lead(), name="group-commit")
        return await waiting.future

    async def finish(self) -> None:
        """Wait until the transactions queued so far are committed (or failed): at shutdown,
        before the engine is disposed under them."""
        while (leader := self._leader) is not None:
            await asyncio.wait({leader})

    async def _lead(self) -> None:
        try:
            while self._queue:
                idle = 0
                while len(self._queue) < self._max_group and idle < _IDLE_TURNS:
                    before = len(self._queue)
                    await asyncio.sleep(0)
                    idle = idle + 1 if len(self._queue) == before else 0
                group = self._queue[:self._max_group]
                del self._queue[:len(group)]
                # A caller cancelled before its turn (a shutdown) gets no transaction.
                group = [w for w in group if not w.future.done()]
                if group:
                    self._sizes.observe(len(group))
                    await self._commit(group)
        except BaseException as exc:
            # Cancelled (the loop is closing) or a bug of ours: no caller waits forever.
            for waiting in self._queue:
                if not waiting.future.done():
                    waiting.future.set_exception(RuntimeError(f"not committed: {exc!r}"))
            self._queue.clear()
            raise
        finally:
            self._leader = None

    async def _commit(self, group: list[_Waiting[Any]]) -> None:
        results: list[Any] = []
        try:
            async with self._write_lock, self._engine.begin() as conn:
                for waiting in group:
                    results.append(await asyncio.create_task(waiting.work(conn),
                                                             context=waiting.context))
        except Exception as exc:
            if len(group) == 1:
                _settle(group[0], error=exc)
                return
            for waiting in group:  # alone now, each with its own outcome
                await self._commit([waiting])
            return
        for waiting, result in zip(group, results, strict=True):
            _settle(waiting, result=result)


def _settle(waiting: _Waiting[Any], *, result: Any = None,
            error: BaseException | None = None) -> None:
    if waiting.future.done():  # its caller gave up; the transaction stands regardless
        return
    if error is not None:
        waiting.future.set_exception(error)
    else:
        waiting.future.set_result(result)
