"""Catch-up: replay the history the broker keeps of each event into one subscriber's queue.

Every business event's producer binds a stream to the event's exchange
(`Topology.history_stream`), so the broker keeps a bounded history of what was published,
whoever was subscribed then. `catch_up` reads that history, from its start or from a time,
and sends a copy of each event to one subscriber's queue only: through the queue's own
dead-letter exchange with the queue's name as routing key, which only that queue is bound
with. Copies are persistent, confirmed and mandatory and keep the original's properties; a
user tagged `impersonator` sends each as its producer's broker user, so a subscriber that
believes the broker (`common.ops.access`) accepts it. The subscriber handles copies as any
delivery: its inbox drops an event it already has, so catching up twice has one effect, and
no other subscriber sees anything.

Async functions that return data and print nothing; `common/ops/catchup_cli.py` is the
terminal side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import AMQPError, ChannelNotFoundEntity

from common.events import EVENT_TYPES, Event, SubscriberAnnounced
from common.kit.broker import ORIGINAL_USER, connect, login_of
from common.kit.logging import get_logger
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops.dlq_replay import can_impersonate

log = get_logger(__name__)

#: The connection's name on the broker.
CLIENT = "shop-catch-up"
#: The type of the message that marks where a catch-up stops (`_mark_ends`).
END_MARKER = "shop.catch-up.end"
#: A copy's header saying when a catch-up sent it.
CAUGHT_UP_AT = "x-caught-up-at"
#: Headers a copy does not keep: the broker adds the first to each delivery from a stream;
#: the second names a sender, which only the kit's own copies may (`sender_of`).
_DROPPED_HEADERS = frozenset({"x-stream-offset", ORIGINAL_USER})
#: Copies awaiting their confirms at once; the stream consumer's prefetch is above it.
WINDOW = 128
PREFETCH = 256
#: Seconds the history may stay silent before its end is reached.
IDLE_TIMEOUT = 30.0
#: The stream finds a time to the second, by the broker's clock, a chunk at a time; reading
#: from a little earlier, with each event's own time deciding, keeps clocks a minute or two
#: apart from losing events.
READ_EARLIER = timedelta(minutes=5)

#: The events whose history is kept: every business event (not receipts, announcements).
HISTORY_EVENTS = {name: cls for name, cls in EVENT_TYPES.items()
                  if cls.routing != SubscriberAnnounced.routing}

_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class CatchUpError(RuntimeError):
    """A catch-up cannot go on; the message says why and what to do."""


@dataclass
class Replayed:
    """What a catch-up did for one event type."""

    event_type: str
    queue: str
    history: str
    #: The broker keeps a history of the event (its stream exists).
    kept: bool = True
    replayed: int = 0
    #: Read but not sent: occurred before --since.
    before_since: int = 0
    #: Read but not sent: older than the subscriber's dedupe remembers (SHOP_RETENTION_HOURS),
    #: so a copy could repeat an effect it already had.
    too_old: int = 0
    #: Where this event's history ends for this catch-up (the end marker's id).
    end: str = field(default="", repr=False)

    def summary(self) -> dict[str, Any]:
        return {"event_type": self.event_type, "queue": self.queue, "history": self.history,
                "history_kept": self.kept, "replayed": self.replayed,
                "skipped_before_since": self.before_since, "skipped_too_old": self.too_old}


@dataclass(frozen=True)
class CatchUp:
    """What `catch_up` did, per event type."""

    service: str
    since: datetime | None
    #: Events that occurred before this were left out (the subscriber's dedupe memory).
    oldest: datetime
    events: list[Replayed]

    @property
    def replayed(self) -> int:
        return sum(e.replayed for e in self.events)

    def summary(self) -> dict[str, Any]:
        return {"service": self.service,
                "since": self.since.isoformat() if self.since else None,
                "from_start": self.since is None, "oldest": self.oldest.isoformat(),
                "replayed": self.replayed, "events": [e.summary() for e in self.events]}


async def subscriber_queues(connection: AbstractRobustConnection, topology: Topology,
                            service: str) -> dict[type[Event], str]:
    """The queues `service` consumes business events from, as the broker has them.

    Found by the names the kit gives them (`Topology.queue`), so a subscriber added later
    is known as soon as it has declared its queues. The one place that says which queues a
    service has: when services are discovered by entry point, it can ask the service's
    declaration which events it handles instead.
    """
    found = {}
    for cls in HISTORY_EVENTS.values():
        name = topology.queue(service, cls)
        if await _exists(connection, name):
            found[cls] = name
    return found


async def catch_up(settings: ServiceSettings, service: str, *,
                   events: Collection[str] | None = None, since: datetime | None = None,
                   now: datetime | None = None) -> CatchUp:
    """Replay the kept history of the events `service` consumes (or of `events`, by type
    name) into its queues, from the start of what is kept (`since` None) or the events that
    occurred at or after `since`; up to the end of each history as of the start.
    """
    now = now or datetime.now(UTC)
    if not _SERVICE_NAME.match(service):
        raise CatchUpError(f"{service!r} is not a service name (letters, digits, '-' and '_')")
    if since is not None and since > now:
        raise CatchUpError(f"--since {since.isoformat()} is in the future")
    unknown = sorted(set(events or ()) - set(HISTORY_EVENTS))
    if unknown:
        raise CatchUpError(f"unknown event type {', '.join(unknown)}; one of "
                           f"{', '.join(sorted(HISTORY_EVENTS))}")
    # An event older than the subscriber's dedupe memory may be one it handled and forgot:
    # sending it again could repeat its effect. A margin keeps clear of the cleanup's edge.
    retention = timedelta(hours=settings.retention_hours)
    oldest = now - retention + min(timedelta(hours=1), retention / 10)
    topology = Topology.of(settings)
    impersonate = await can_impersonate(settings)
    async with _broker(settings) as connection:
        queues = await _chosen_queues(connection, topology, service, events)
        reports = [Replayed(cls.model_fields["event_type"].default, queue,
                            topology.history_stream(cls)) for cls, queue in queues.items()]
        try:
            await _mark_ends(connection, reports)
            for report in reports:
                if report.kept:
                    await _replay(connection, topology, report, since=since, oldest=oldest,
                                  impersonate=impersonate, login=login_of(connection))
        except AMQPError as exc:  # refused (rights), or a queue gone meanwhile
            done = ", ".join(f"{r.event_type}: {r.replayed}" for r in reports)
            raise CatchUpError(
                f"the broker refused ({type(exc).__name__}: {exc}); replayed so far: {done}. "
                "Catching up needs an administrator's AMQP_URL; running it again is "
                "harmless.") from exc
    return CatchUp(service=service, since=since, oldest=oldest, events=reports)


async def _chosen_queues(connection: AbstractRobustConnection, topology: Topology,
                         service: str, events: Collection[str] | None
                         ) -> dict[type[Event], str]:
    queues = await subscriber_queues(connection, topology, service)
    where = (f" with SHOP_NAME_PREFIX={topology.prefix!r}" if topology.prefix
             else " (SHOP_NAME_PREFIX is empty)")
    if not queues:
        raise CatchUpError(f"{service!r} has no queue on this broker{where}: a subscriber "
                           "declares its queues when it first starts; start it, then catch up")
    if not events:
        return queues
    chosen = {cls: queue for cls, queue in queues.items()
              if cls.model_fields["event_type"].default in events}
    missing = sorted(set(events) - {cls.model_fields["event_type"].default for cls in chosen})
    if missing:
        raise CatchUpError(f"{service!r} has no queue for {', '.join(missing)} on this "
                           f"broker{where}; it consumes "
                           + ", ".join(sorted(c.model_fields["event_type"].default
                                              for c in queues)))
    return chosen


async def _mark_ends(connection: AbstractRobustConnection, reports: list[Replayed]) -> None:
    """Append a marker to each history, all before any is read: each replay stops there, so
    it ends where the history ended as the catch-up started, however much is published
    meanwhile (the subscriber's queue gets that itself).

    A stream tells no reader where it ends (its message count lags by seconds), hence the
    marker; other catch-ups pass over it. It goes through the default exchange straight to
    the stream, so no subscriber sees it.
    """
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        for report in reports:
            if not await _exists(connection, report.history):
                report.kept = False
                continue
            report.end = str(uuid.uuid4())
            await channel.default_exchange.publish(
                aio_pika.Message(b"", type=END_MARKER, message_id=report.end,
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=report.history, mandatory=True, timeout=30)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def _replay(connection: AbstractRobustConnection, topology: Topology, report: Replayed,
                  *, since: datetime | None, oldest: datetime, impersonate: bool,
                  login: str) -> None:
    """Send the history of one event to the subscriber's queue, up to its end marker."""
    log.info("catching up", event_type=report.event_type, queue=report.queue,
             history=report.history)
    sender = await connection.channel(publisher_confirms=True, on_return_raises=True)
    reader = await connection.channel()
    pending: list[tuple[asyncio.Future[Any], AbstractIncomingMessage]] = []
    try:
        target = await sender.get_exchange(topology.dead_letter_exchange(report.queue))
        await reader.set_qos(prefetch_count=PREFETCH)
        stream = await reader.declare_queue(report.history, passive=True)
        arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        start: Any = "first" if since is None else since - READ_EARLIER
        await stream.consume(arrived.put, arguments={"x-stream-offset": start})
        now = datetime.now(UTC).isoformat()
        while (message := await _next(arrived, report)).message_id != report.end:
            occurred = None if message.type == END_MARKER else _occurred_at(message)
            if message.type == END_MARKER:  # another catch-up's
                await message.ack()
            elif occurred is not None and occurred < oldest:
                report.too_old += 1
                await message.ack()
            elif since is not None and occurred is not None and occurred < since:
                report.before_since += 1
                await message.ack()
            else:
                copy = _copy(message, _user_for(message, impersonate, login), now)
                pending.append((asyncio.ensure_future(_send(target, copy, report.queue)),
                                message))
                if len(pending) >= WINDOW:
                    await _settle(pending, report)
        await _settle(pending, report)
    finally:
        if pending:  # stopped by an error: count what the broker confirmed all the same
            with contextlib.suppress(CatchUpError):
                await _settle(pending, report)
        for channel in (reader, sender):
            with contextlib.suppress(Exception):
                await channel.close()
    log.info("caught up", event_type=report.event_type, queue=report.queue,
             replayed=report.replayed, before_since=report.before_since,
             too_old=report.too_old)


async def _next(arrived: asyncio.Queue[AbstractIncomingMessage], report: Replayed
                ) -> AbstractIncomingMessage:
    try:
        return await asyncio.wait_for(arrived.get(), IDLE_TIMEOUT)
    except TimeoutError:
        raise CatchUpError(
            f"the history {report.history} gave nothing for {IDLE_TIMEOUT:g} s before its end "
            f"({report.replayed} replayed so far). If --since was given, the broker's clock may "
            f"be more than {READ_EARLIER.total_seconds() / 60:g} minutes behind this "
            "machine's. Running the catch-up again is harmless: the subscriber drops what it "
            "already has.") from None


async def _send(exchange: AbstractExchange, message: aio_pika.Message, queue: str) -> None:
    await exchange.publish(message, routing_key=queue, mandatory=True, timeout=30)


async def _settle(pending: list[tuple[asyncio.Future[Any], AbstractIncomingMessage]],
                  report: Replayed) -> None:
    """Wait for the copies in flight; count those confirmed, then raise for any that was
    not."""
    results = await asyncio.gather(*(future for future, _ in pending), return_exceptions=True)
    failed: BaseException | None = None
    for (_, message), result in zip(pending, results, strict=True):
        if isinstance(result, BaseException):
            failed = failed or result
            continue
        report.replayed += 1
        await message.ack()
    pending.clear()
    if failed is not None:
        raise CatchUpError(
            f"a copy to {report.queue} was not confirmed ({type(failed).__name__}: {failed}); "
            f"{report.replayed} replayed. Running the catch-up again is harmless: the "
            "subscriber drops what it already has.") from failed


def _user_for(message: AbstractIncomingMessage, impersonate: bool, login: str) -> str | None:
    """The broker user a copy is sent as: the original's, which RabbitMQ lets only an
    `impersonator` (or that user itself) claim."""
    sender = message.user_id
    if sender is None or sender == login or impersonate:
        return sender
    raise CatchUpError(
        f"{message.type or 'a message'} {message.message_id} was published by broker user "
        f"{sender!r}: a copy sent as {login!r} would be dead-lettered as forged_producer by a "
        "subscriber that believes the broker. Catch up as a user tagged impersonator (`shop "
        "broker setup` tags the administrator it runs as).")


def _copy(message: AbstractIncomingMessage, user_id: str | None, now: str) -> aio_pika.Message:
    """The message as its producer published it, persistent, marked as a catch-up's copy."""
    headers = {k: v for k, v in (message.headers or {}).items() if k not in _DROPPED_HEADERS}
    headers[CAUGHT_UP_AT] = now
    return aio_pika.Message(
        body=message.body, headers=headers, content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT, priority=message.priority,
        correlation_id=message.correlation_id, reply_to=message.reply_to,
        expiration=message.expiration, message_id=message.message_id,
        timestamp=message.timestamp, type=message.type, user_id=user_id,
        app_id=message.app_id)


def _occurred_at(message: AbstractIncomingMessage) -> datetime | None:
    """When the event occurred: its envelope's `occurred_at`, else the message's timestamp
    (whole seconds); None when neither can be read (it is replayed then)."""
    value: Any = None
    with contextlib.suppress(ValueError, TypeError, KeyError, RecursionError):
        value = datetime.fromisoformat(json.loads(message.body)["occurred_at"])
    if not isinstance(value, datetime):
        value = message.timestamp
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def _exists(connection: AbstractRobustConnection, queue: str) -> bool:
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue, passive=True)
    except ChannelNotFoundEntity:  # the broker closed the channel
        return False
    with contextlib.suppress(Exception):
        await channel.close()
    return True


@contextlib.asynccontextmanager
async def _broker(settings: ServiceSettings) -> AsyncIterator[AbstractRobustConnection]:
    try:
        connection = await connect(settings.amqp_url, CLIENT, wait=10)
    except ConnectionError as exc:
        raise CatchUpError(str(exc)) from exc
    try:
        yield connection
    finally:
        await connection.close()
