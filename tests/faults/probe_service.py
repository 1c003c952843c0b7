"""A test-only subscriber that fails on demand: killed mid-delivery, failing k times, or always.

Run as `python -m tests.faults.probe_service`. It consumes OrderPlaced from its own queue
(`probe.order.placed`) beside the real subscribers, on the real kit (ServiceRunner), and
reads what to do with each order from the order's customer id, so one probe serves every case:

- ``kill-before-commit``: SIGKILL inside the handler, while the kit's transaction is open;
- ``kill-after-commit``: SIGKILL after the kit committed the effect, before the ack;
- ``fail-K`` (``fail-2``): raise K times, then succeed;
- ``fail-always``: raise while the file ``PROBE_BROKEN_FLAG`` exists (delete it to fix);
- anything else: record the effect.

The kills happen once per order (a marker file in ``PROBE_MARKER_DIR``), so the restarted
probe handles the redelivery. Every call of the handler appends a JSON line to
``PROBE_ATTEMPTS_FILE``: the tests read the delays between attempts from it. The effects
table has no unique key on purpose: a second effect would show as a second row.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import ClassVar

import sqlalchemy as sa
from aio_pika.abc import AbstractIncomingMessage
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import Event, OrderPlaced
from common.kit.db import UTCDateTime
from common.kit.logging import configure_logging, get_logger
from common.kit.outbox import utcnow
from common.kit.runner import ServiceRunner, Subscription
from common.kit.service import Handler, ServiceSpec
from common.kit.settings import ServiceSettings

log = get_logger(__name__)

metadata = sa.MetaData()

effects = sa.Table(
    "probe_effects", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.String(36), nullable=False, index=True),
    sa.Column("event_id", sa.String(36), nullable=False),
    sa.Column("customer_id", sa.String(64), nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
)

KILL_BEFORE_COMMIT = "kill-before-commit"
KILL_AFTER_COMMIT = "kill-after-commit"
FAIL_ALWAYS = "fail-always"
FAIL_TIMES = "fail-"


class ProbeSettings(ServiceSettings):
    """Where the probe keeps its markers and its attempt log."""

    model_config = SettingsConfigDict(env_prefix="PROBE_", extra="ignore", populate_by_name=True)
    service_name: ClassVar[str] = "probe"

    marker_dir: Path = Field(Path("probe-markers"),
                             description="One file per kill already done.")
    attempts_file: Path = Field(Path("probe-attempts.jsonl"),
                                description="A JSON line per handler call.")
    broken_flag: Path = Field(Path("probe-broken"),
                              description="While this file exists, fail-always orders fail.")


class ProbeFailureError(RuntimeError):
    """The failure the probe was told to have."""


class ProbeStore:
    """The probe's effects, on the delivery's transaction, with the probe's settings."""

    #: Handler calls per event id in this process (fail-K counts them).
    calls: ClassVar[Counter[str]] = Counter()

    def __init__(self, conn: AsyncConnection, settings: ProbeSettings) -> None:
        self.conn = conn
        self.settings = settings

    async def record(self, event: OrderPlaced) -> None:
        await self.conn.execute(effects.insert().values(
            order_id=str(event.order_id), event_id=str(event.event_id),
            customer_id=event.customer_id, at=utcnow()))

    def log_attempt(self, event: OrderPlaced) -> int:
        """Count this call and append it to the attempt log; returns the call number."""
        self.calls[str(event.event_id)] += 1
        line = {"event_id": str(event.event_id), "order_id": str(event.order_id),
                "customer_id": event.customer_id, "call": self.calls[str(event.event_id)],
                "at": time.time()}
        with self.settings.attempts_file.open("a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
        return self.calls[str(event.event_id)]


def first_time(settings: ProbeSettings, what: str, event: Event) -> bool:
    """True only the first time this is asked for `what` and this event (a marker file)."""
    settings.marker_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(settings.marker_dir / f"{what}-{event.event_id}",
                     os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def die(why: str) -> None:
    """SIGKILL this process: no cleanup, no ack, no rollback beyond what the database does."""
    log.warning("probe kills itself", why=why)
    os.kill(os.getpid(), signal.SIGKILL)


async def record_order(event: OrderPlaced, store: ProbeStore) -> Sequence[Event]:
    """Record the order, after failing or dying first when its customer id says so."""
    call = store.log_attempt(event)
    customer = event.customer_id
    await store.record(event)
    if customer == KILL_BEFORE_COMMIT and first_time(store.settings, customer, event):
        die("before commit")  # the effect above is written but not committed
    if customer == FAIL_ALWAYS and store.settings.broken_flag.exists():
        raise ProbeFailureError(f"the probe is broken (flag {store.settings.broken_flag})")
    times = customer.removeprefix(FAIL_TIMES)
    if customer.startswith(FAIL_TIMES) and times.isdigit() and call <= int(times):
        raise ProbeFailureError(f"planned failure {call} of {customer}")
    return []


HANDLERS: dict[type[Event], Handler[ProbeStore]] = {OrderPlaced: record_order}


class ProbeRunner(ServiceRunner[ProbeStore]):
    """The kit's runner, with a kill between the commit and the ack."""

    settings: ProbeSettings

    async def _handle(self, sub: Subscription[ProbeStore], event: Event,
                      handler: Handler[ProbeStore], received_at: datetime,
                      started: float) -> bool:
        duplicate = await super()._handle(sub, event, handler, received_at, started)
        self._die_if_victim([event])
        return duplicate

    async def _handle_batch(self, sub: Subscription[ProbeStore],
                            decoded: Sequence[tuple[AbstractIncomingMessage, Event,
                                                    Handler[ProbeStore]]],
                            received_at: datetime, started: float) -> list[str]:
        # The victim may come with others (a batch): die after the batch's commit.
        outcomes = await super()._handle_batch(sub, decoded, received_at, started)
        self._die_if_victim([event for _, event, _ in decoded])
        return outcomes

    def _die_if_victim(self, events: Sequence[Event]) -> None:
        for event in events:
            if (isinstance(event, OrderPlaced) and event.customer_id == KILL_AFTER_COMMIT
                    and first_time(self.settings, KILL_AFTER_COMMIT, event)):
                die("after commit, before ack")


def spec_for(settings: ProbeSettings) -> ServiceSpec[ProbeStore]:
    return ServiceSpec(name="probe", handlers=HANDLERS,
                       store=partial(ProbeStore, settings=settings), metadata=metadata)


async def serve(settings: ProbeSettings) -> None:
    """Run the probe until SIGTERM or SIGINT, then stop it the kit's way."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    async with ProbeRunner(spec_for(settings), settings):
        await stopping.wait()


def main() -> None:
    settings = ProbeSettings()
    configure_logging(settings)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
