"""A consumer in a process of its own: raw aio-pika, FastStream or the kit's runner.

`python -m bench.worker KIND --url URL --queue NAME --count N --prefetch P [...]` consumes
`N` messages of `NAME`, validating each as an OrderPlaced and acking it, then prints one
JSON line with when the first message arrived and the last was done (time.monotonic, which
on Linux is one clock for every process), and the CPU seconds it used meanwhile. Before
consuming it prints {"ready": true}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import Event, OrderPlaced
from common.kit.logging import configure_logging
from common.kit.runner import ServiceRunner, Subscription
from common.kit.service import ServiceSpec
from common.kit.settings import ServiceSettings

#: The kit's no-op subscriber: its name makes its queue `<prefix>benchkit.order.placed`.
KIT_SERVICE = "benchkit"


@dataclass
class Progress:
    """Arrival of the first message, completion of the last, and how many so far."""

    count: int
    done: asyncio.Event
    first: float | None = None
    last: float | None = None
    handled: int = 0
    invalid: int = 0
    cpu_start: float = 0.0
    #: Batches the kit's runner handled the deliveries in (None for the other consumers).
    batches: int | None = None

    def arrived(self) -> None:
        if self.first is None:
            self.first = time.monotonic()

    def finished_one(self) -> None:
        self.handled += 1
        if self.handled >= self.count and self.last is None:
            self.last = time.monotonic()
            self.done.set()

    def result(self, **extra: Any) -> dict[str, Any]:
        return {"first": self.first, "last": self.last, "handled": self.handled,
                "invalid": self.invalid, "batches": self.batches,
                "cpu_s": time.process_time() - self.cpu_start,
                **extra}


def say(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


async def consume_raw(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Plain aio-pika: validate with pydantic, ack; nothing else."""
    connection = await aio_pika.connect(args.url, timeout=10)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=args.prefetch)
        queue = await channel.get_queue(args.queue, ensure=True)

        async def on_message(message: AbstractIncomingMessage) -> None:
            progress.arrived()
            try:
                OrderPlaced.model_validate_json(message.body)
            except ValidationError:
                progress.invalid += 1
            await message.ack()
            progress.finished_one()

        say({"ready": True})
        progress.cpu_start = time.process_time()
        await queue.consume(on_message)
        await asyncio.wait_for(progress.done.wait(), args.timeout)
        return progress.result()
    finally:
        await connection.close()


async def consume_faststream(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """FastStream's RabbitMQ subscriber with a pydantic model argument; it acks on return.

    Its per-message access log is at INFO, so it gets a logger at WARNING, as the kit's
    services run in the bench (LOG_LEVEL=WARNING): neither pays for a log line a message.
    """
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    quiet = logging.getLogger("bench.faststream")
    quiet.setLevel(logging.WARNING)
    broker = RabbitBroker(args.url, logger=quiet)

    async def handle(event: OrderPlaced) -> None:
        progress.arrived()
        progress.finished_one()

    # Registered by a call rather than as a decorator: without the `bench` extra (make lint)
    # FastStream is untyped, and an untyped decorator would make the handler untyped too.
    broker.subscriber(RabbitQueue(args.queue, declare=False),
                      channel=Channel(prefetch_count=args.prefetch))(handle)

    await broker.connect()
    say({"ready": True})
    progress.cpu_start = time.process_time()
    await broker.start()
    try:
        await asyncio.wait_for(progress.done.wait(), args.timeout)
        # The handler's return is followed by FastStream's ack: let it go out.
        await asyncio.sleep(0)
        return progress.result()
    finally:
        await broker.stop()


class KitSettings(ServiceSettings):
    """The no-op kit subscriber's settings (BENCHKIT_ variables, if any)."""

    model_config = SettingsConfigDict(env_prefix="BENCHKIT_", extra="ignore",
                                      populate_by_name=True)
    service_name: ClassVar[str] = KIT_SERVICE


async def _nothing(event: OrderPlaced, store: AsyncConnection) -> Sequence[Event]:
    """The handler that does nothing: what is left is the kit's own cost."""
    return []


class CountingRunner(ServiceRunner[AsyncConnection]):
    """The kit's runner, unchanged, with a count of deliveries finished (acked)."""

    progress: Progress

    async def _deliver_batch(self, sub: Subscription[AsyncConnection],
                             messages: Sequence[AbstractIncomingMessage]) -> None:
        if sub.receipts:
            self.progress.arrived()
            self.progress.batches = (self.progress.batches or 0) + 1
        await super()._deliver_batch(sub, messages)
        if sub.receipts:
            for _ in messages:
                self.progress.finished_one()


def _store(conn: AsyncConnection) -> AsyncConnection:
    return conn


async def consume_kit(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """The kit's subscriber runner on the queue: decode, validate, dedupe, commit (with the
    receipt in the outbox), ack; the relay publishes the receipts."""
    settings = KitSettings(amqp_url=args.url, name_prefix=args.prefix, data_dir=args.data_dir,
                           prefetch=args.prefetch, log_level="WARNING", log_format="json",
                           metrics_port=0)
    configure_logging(settings)
    spec: ServiceSpec[AsyncConnection] = ServiceSpec(
        name=KIT_SERVICE, handlers={OrderPlaced: _nothing}, store=_store, metadata=MetaData())
    runner = CountingRunner(spec, settings, broker_wait=30)
    runner.progress = progress
    say({"ready": True})
    progress.cpu_start = time.process_time()
    runtime = await runner.__aenter__()
    try:
        await asyncio.wait_for(progress.done.wait(), args.timeout)
        result = progress.result()
        # The receipts committed with the last deliveries are still to be published.
        relay = runtime.relay
        published = await relay.wait_idle(args.timeout) if relay is not None else False
        result["receipts_published"] = time.monotonic() if published else None
        result["cpu_s_with_receipts"] = time.process_time() - progress.cpu_start
        return result
    finally:
        await runner.stop()


KINDS = {"raw": consume_raw, "faststream": consume_faststream, "kit": consume_kit}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--prefix", default="")
    parser.add_argument("--data-dir", type=Path, default=Path("."))
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def run() -> dict[str, Any]:
        progress = Progress(count=args.count, done=asyncio.Event())
        return await KINDS[args.kind](args, progress)

    say({"result": asyncio.run(run())})


if __name__ == "__main__":
    main()
