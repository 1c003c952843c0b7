"""The dead-letter queues: which a service has, and what waits in them, read without taking
anything away.

Async functions that return data and print nothing; `common/ops/dlq_cli.py` is the terminal
side, `common/ops/dlq_replay.py` sends dead letters back or purges them.

Browsing never loses or reorders a message: the dead-letter queues are classic queues, read
with basic.get *without* ack on one channel, and closing that channel returns every unacked
message to its original place.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelNotFoundEntity
from yarl import URL

from common.kit import discovery
from common.kit.broker import connect
from common.kit.settings import ServiceSettings
from common.ops.dead_letter import DeadLetter, describe
from common.ops.observe import dead_letter_queue, management_queue_names, service_queues

#: The name the DLQ tools connect under, and the producer their replay receipts name.
PRODUCER = "shop-dlq"


_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class DlqError(RuntimeError):
    """An operation cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class Listing:
    """What `list` found: the dead letters read, and how many each queue holds."""

    letters: list[DeadLetter]
    #: Messages ready in each existing dead-letter queue (a service's queues never declared
    #: yet are left out).
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# --- which queues -------------------------------------------------------------------------

def service_dead_letter_queues(prefix: str, service: str) -> list[str]:
    """An installed service's dead-letter queues, from its declaration (and, for the order
    service, the audit queue its tracker consumes)."""
    return sorted(dead_letter_queue(q) for q in service_queues(prefix, service))


async def dead_letter_queues(settings: ServiceSettings, service: str) -> list[str]:
    """The dead-letter queues of `service`.

    An installed service's come from its declaration; any other (a subscriber installed
    elsewhere) is looked up on the broker as `{prefix}{service}.*.dlq` through the management
    API. Raises DlqError when the API does not answer or the service has no such queue.
    """
    if not _SERVICE_NAME.match(service):
        raise DlqError(f"{service!r} is not a service name (letters, digits, '-' and '_')")
    installed = discovery.names()
    if service in installed:
        return service_dead_letter_queues(settings.name_prefix, service)
    try:
        names = await management_queue_names(settings)
    except (httpx.HTTPError, ValueError) as exc:
        raise DlqError(
            f"{service!r} is not one of the installed services ({', '.join(installed)}); "
            f"finding its dead-letter queues needs the RabbitMQ management API, which did not "
            f"answer at {_safe(settings.management_url)} ({exc}). "
            "Set RABBITMQ_MANAGEMENT_URL, or enable the management plugin.") from exc
    start = f"{settings.name_prefix}{service}."
    found = sorted(n for n in names if n.startswith(start) and n.endswith(".dlq"))
    if not found:
        raise DlqError(
            f"no dead-letter queues for service {service!r}: the broker has no queue named "
            f"{start}*.dlq. Installed services: {', '.join(installed)}, or any subscriber "
            "that has run against this broker"
            + (f" with SHOP_NAME_PREFIX={settings.name_prefix!r}." if settings.name_prefix
               else " (SHOP_NAME_PREFIX is empty)."))
    return found


async def system_dead_letter_queues(settings: ServiceSettings) -> list[str]:
    """Every dead-letter queue of the system: the installed services', and when the
    management API answers, every other `{prefix}*.dlq` on the broker."""
    names = {q for s in discovery.names()
             for q in service_dead_letter_queues(settings.name_prefix, s)}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        names |= {n for n in await management_queue_names(settings)
                  if n.startswith(settings.name_prefix) and n.endswith(".dlq")}
    return sorted(names)


# --- reading them ------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def connected(settings: ServiceSettings) -> AsyncIterator[AbstractRobustConnection]:
    """A connection to the broker for the length of one operation."""
    try:
        connection = await connect(settings.amqp_url, PRODUCER, wait=10)
    except ConnectionError as exc:
        raise DlqError(str(exc)) from exc
    try:
        yield connection
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def open_queue(connection: AbstractRobustConnection, name: str
                     ) -> AsyncIterator[tuple[AbstractChannel, AbstractQueue] | None]:
    """A channel and the queue `name` on it, or None when the queue does not exist.

    Closing the channel on the way out returns every message read from it and not acked.
    """
    channel = await connection.channel()
    try:
        try:
            queue = await channel.declare_queue(name, passive=True)
        except ChannelNotFoundEntity:  # the queue was never declared (the channel is closed)
            yield None
            return
        yield channel, queue
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


def ready(queue: AbstractQueue) -> int:
    """Messages ready in `queue` when it was opened."""
    return int(queue.declaration_result.message_count or 0)


async def unacked(queue: AbstractQueue, limit: int) -> AsyncIterator[AbstractIncomingMessage]:
    """Up to `limit` messages, taken without ack: they stay the channel's until it closes."""
    for _ in range(limit):
        message = await queue.get(no_ack=False, fail=False, timeout=10)
        if message is None:
            return
        yield message


async def count_dead_letters(settings: ServiceSettings, service: str) -> dict[str, int]:
    """Messages waiting in each existing dead-letter queue of `service`."""
    queues = await dead_letter_queues(settings, service)
    async with connected(settings) as connection:
        return await _counts(connection, queues)


async def _counts(connection: AbstractRobustConnection, queues: list[str]) -> dict[str, int]:
    counts = {}
    for name in queues:
        async with open_queue(connection, name) as opened:
            if opened is not None:
                counts[name] = ready(opened[1])
    return counts


async def list_dead_letters(settings: ServiceSettings, service: str, *, limit: int = 1000
                            ) -> Listing:
    """The dead letters of `service`, oldest first in each queue, up to `limit` in all.

    Nothing is consumed: each queue is read without ack on its own channel, and closing it
    puts every message back where it was.
    """
    queues = await dead_letter_queues(settings, service)
    letters: list[DeadLetter] = []
    counts: dict[str, int] = {}
    async with connected(settings) as connection:
        for name in queues:
            async with open_queue(connection, name) as opened:
                if opened is None:
                    continue
                _channel, queue = opened
                counts[name] = ready(queue)
                async for message in unacked(queue, max(0, min(limit - len(letters),
                                                              counts[name]))):
                    letters.append(describe(name, message))
    return Listing(letters, counts)


async def find_dead_letters(settings: ServiceSettings, message_id: str) -> list[DeadLetter]:
    """Every dead letter with this message id, in any dead-letter queue of the system.

    One event reaches every subscriber, so it can be dead-lettered in several services.
    """
    found: list[DeadLetter] = []
    queues = await system_dead_letter_queues(settings)
    async with connected(settings) as connection:
        for name in queues:
            async with open_queue(connection, name) as opened:
                if opened is None:
                    continue
                _channel, queue = opened
                async for message in unacked(queue, ready(queue)):
                    if message.message_id == message_id:
                        found.append(describe(name, message))
    return found


def _safe(url: str) -> str:
    parsed = URL(url)
    return str(parsed.with_password("***") if parsed.password else parsed)
