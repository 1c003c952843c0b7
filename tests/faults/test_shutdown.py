"""SIGTERM must stop a service: the outbox relay ends when cancelled, whatever wakes it.

Found by the fault suite: after a broker restart, `order` sometimes ignored SIGTERM until it
was killed. ServiceRunner.stop() cancels the relay task and waits for it; when a commit wakes
the relay at that moment, Python 3.11's asyncio.wait_for (in Relay._wait) returns the
event's result and drops the cancellation (CPython gh-86296, fixed in 3.12), so the relay
loops on and stop() waits forever. This reproduces the race deterministically, in-process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import pytest

from common.kit.broker import Publisher
from common.kit.commit import GroupCommit
from common.kit.db import create_tables, make_engine
from common.kit.outbox import Relay, kit_metadata

pytestmark = pytest.mark.faults


def waiting_to_be_woken(task: asyncio.Task[None]) -> bool:
    """Whether the relay is parked in its wait for a wake-up (Relay._wait): the chain of
    coroutines the task awaits names it."""
    awaited: object = task.get_coro()
    while awaited is not None:
        code = getattr(awaited, "cr_code", None)
        if code is not None and code.co_name == "_wait":
            return True
        awaited = getattr(awaited, "cr_await", None)
    return False


async def test_the_relay_stops_when_cancelled_just_as_a_commit_wakes_it(tmp_path: Path
                                                                         ) -> None:
    """relay.wake() (any commit) right before the task is cancelled (SIGTERM): the relay
    task still ends, so a service's stop() can finish."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}")
    await create_tables(engine, kit_metadata)
    # The outbox is empty, so the relay never publishes: it needs no broker.
    relay = Relay(engine, cast(Publisher, object()), commits=GroupCommit(engine, asyncio.Lock()),
                  poll_interval=60)
    task = asyncio.create_task(relay.run())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not waiting_to_be_woken(task):
            assert loop.time() < deadline, "the idle relay should park in Relay._wait"
            await asyncio.sleep(0.01)  # polling interval under the deadline above
        relay.wake()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done, "the relay swallowed its cancellation and runs on"
        assert task.cancelled()
    finally:
        if not task.done():
            task.cancel()  # a second cancel ends it: nothing wakes it this time
            await asyncio.wait({task}, timeout=5)
        await engine.dispose()
