"""Dead-letter operations: find a service's dead-letter queues, browse, replay and purge them.

Async functions that return data and print nothing; `common/ops/dlq_cli.py` is the terminal side.

Browsing never loses or reorders a message: the dead-letter queues are classic queues, read
with basic.get *without* ack on one channel, and closing that channel returns every unacked
message to its original place. Replay acks a dead letter only after its copy back to the
service's queue is confirmed by the broker.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractMessage,
    AbstractQueue,
    AbstractRobustConnection,
    HeadersType,
)
from aio_pika.exceptions import ChannelNotFoundEntity
from yarl import URL

from common.events import DeliveryReceipt
from common.kit import discovery
from common.kit.broker import Publisher, connect, sender_of
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops.observe import (
    ManagementApi,
    dead_letter_queue,
    management_queue_names,
    service_queues,
)

#: Who the replay receipts say produced them.
PRODUCER = "shop-dlq"

#: Headers that describe a failure or a broker dead-lettering; a replayed copy starts
#: without them (the attempts are reset). x-original-exchange stays: it says where the event
#: was first published, which the default exchange used for the replay cannot tell.
FAILURE_HEADERS = frozenset({
    "x-attempts", "x-error-reason", "x-exception-type", "x-exception-message", "x-failed-at",
    "x-first-failed-at", "x-service", "x-original-queue",
    "x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
    "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason", "x-delivery-count",
})

#: What a broker dead-lettering reason means to an operator (x-death "reason").
BROKER_REASONS = {
    "delivery_limit": "delivery limit: the consumer crashed or lost its connection on every "
                      "delivery",
    "rejected": "rejected by a consumer without requeue",
    "expired": "expired: its time to live ran out",
    "maxlen": "the queue's length limit was reached",
}

_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class DlqError(RuntimeError):
    """An operation cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class DeadLetter:
    """One message in a dead-letter queue, read without taking it away."""

    dlq: str
    message_id: str | None
    event_type: str | None
    correlation_id: str | None
    #: x-error-reason (handler_error, retries_exhausted, poison), or for a message the broker
    #: dead-lettered itself, what the broker's reason means.
    reason: str
    #: True when the broker dead-lettered it (x-death), not the kit.
    by_broker: bool
    exception_type: str | None
    exception_message: str | None
    #: Failed attempts the kit counted (x-attempts); None when the broker parked it.
    attempts: int | None
    failed_at: datetime | None
    first_failed_at: datetime | None
    #: The service queue a replay sends it back to.
    original_queue: str
    replay_count: int
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes = field(repr=False)

    def age(self, now: datetime | None = None) -> timedelta | None:
        """Time since it was dead-lettered (or published, when nothing better is known)."""
        if self.failed_at is None:
            return None
        return (now or datetime.now(UTC)) - self.failed_at

    @property
    def exception(self) -> str | None:
        if not self.exception_type:
            return None
        return f"{self.exception_type}: {self.exception_message or ''}".rstrip(": ")

    def body_json(self) -> Any:
        """The body parsed as JSON, or as text when it is not JSON."""
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return self.body.decode("utf-8", errors="replace")

    def summary(self, now: datetime | None = None) -> dict[str, Any]:
        """A row of `shop dlq list --json`."""
        age = self.age(now)
        return {
            "event_id": self.message_id,
            "event_type": self.event_type,
            "queue": self.dlq,
            "original_queue": self.original_queue,
            "reason": self.reason,
            "by_broker": self.by_broker,
            "exception_type": self.exception_type,
            "exception_message": self.exception_message,
            "attempts": self.attempts,
            "failed_at": _iso(self.failed_at),
            "first_failed_at": _iso(self.first_failed_at),
            "age_seconds": None if age is None else round(age.total_seconds(), 3),
            "correlation_id": self.correlation_id,
            "replay_count": self.replay_count,
        }

    def details(self) -> dict[str, Any]:
        """Everything about it, for `shop dlq show --json`."""
        return {**self.summary(), "properties": self.properties, "headers": self.headers,
                "body": self.body_json()}


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


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did."""

    replayed: list[DeadLetter] = field(default_factory=list)
    #: Dead letters that stayed in their queue, and why.
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)
    #: Ids asked for with --id that no dead-letter queue of the service holds.
    not_found: list[str] = field(default_factory=list)
    #: Replays done whose receipt could not be published.
    receipt_errors: list[str] = field(default_factory=list)


# --- reading one message ------------------------------------------------------------------

def describe(dlq: str, message: AbstractMessage) -> DeadLetter:
    """What a dead-lettered message says about itself, from its headers and properties."""
    headers = dict(message.headers or {})
    deaths = headers.get("x-death")
    by_broker = bool(deaths) or "x-first-death-reason" in headers
    if by_broker:
        # The kit strips the broker's headers from every copy it parks, so they mean the
        # broker dead-lettered this one itself. x-death lists the most recent death first.
        last = deaths[0] if isinstance(deaths, list) and deaths and isinstance(
            deaths[0], Mapping) else {}
        code = str(headers.get("x-last-death-reason") or last.get("reason")
                   or headers.get("x-first-death-reason") or "unknown")
        reason = BROKER_REASONS.get(code, f"dead-lettered by the broker: {code}")
        failed_at = _datetime(last.get("time")) or _datetime(message.timestamp)
        attempts = None
    else:
        reason = _text(headers.get("x-error-reason")) or "unknown"
        failed_at = _datetime(headers.get("x-failed-at")) or _datetime(message.timestamp)
        attempts = _int(headers.get("x-attempts"))
    original = _text(headers.get("x-original-queue")) or _strip_dlq(dlq)
    return DeadLetter(
        dlq=dlq,
        message_id=message.message_id,
        event_type=message.type,
        correlation_id=message.correlation_id,
        reason=reason,
        by_broker=by_broker,
        exception_type=_text(headers.get("x-exception-type")),
        exception_message=_text(headers.get("x-exception-message")),
        attempts=attempts,
        failed_at=failed_at,
        first_failed_at=_datetime(headers.get("x-first-failed-at")),
        original_queue=original,
        replay_count=_int(headers.get("x-replay-count")) or 0,
        headers={k: jsonable(v) for k, v in sorted(headers.items())},
        properties={k: jsonable(v) for k, v in {
            "message_id": message.message_id,
            "type": message.type,
            "correlation_id": message.correlation_id,
            "content_type": message.content_type,
            "app_id": message.app_id,
            "timestamp": message.timestamp,
            "delivery_mode": int(message.delivery_mode),
        }.items() if v is not None},
        body=message.body,
    )


def replay_headers(headers: HeadersType | None, now: datetime | None = None) -> HeadersType:
    """The headers of a replayed copy: attempts and failure reset, the replay counted."""
    old = dict(headers or {})
    new: dict[str, Any] = {k: v for k, v in old.items() if k not in FAILURE_HEADERS}
    new["x-replayed-at"] = (now or datetime.now(UTC)).isoformat()
    new["x-replay-count"] = (_int(old.get("x-replay-count")) or 0) + 1
    return new


def replay_receipt(letter: DeadLetter, service: str, now: datetime | None = None, *,
                   on_behalf: bool = False) -> DeliveryReceipt:
    """The trace a replay leaves in the receipts: outcome "replayed".

    `on_behalf`: sent as the service's own broker user (impersonated), so it names the
    service as its producer, as the broker will.
    """
    return DeliveryReceipt(
        subscriber=service,
        queue=letter.original_queue,
        handled_event_id=letter.message_id,
        handled_event_type=letter.event_type,
        outcome="replayed",
        received_at=now or datetime.now(UTC),
        duration_ms=0,
        correlation_id=letter.correlation_id,
        causation_id=_uuid(letter.message_id),
        producer=service if on_behalf else PRODUCER,
    )


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


# --- operations ---------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def _broker(settings: ServiceSettings) -> AsyncIterator[AbstractRobustConnection]:
    try:
        connection = await connect(settings.amqp_url, PRODUCER, wait=10)
    except ConnectionError as exc:
        raise DlqError(str(exc)) from exc
    try:
        yield connection
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def _open(connection: AbstractRobustConnection, name: str
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


def _ready(queue: AbstractQueue) -> int:
    return int(queue.declaration_result.message_count or 0)


async def _read(queue: AbstractQueue, limit: int) -> AsyncIterator[AbstractIncomingMessage]:
    """Up to `limit` messages, taken without ack: they stay the channel's until it closes."""
    for _ in range(limit):
        message = await queue.get(no_ack=False, fail=False, timeout=10)
        if message is None:
            return
        yield message


async def count_dead_letters(settings: ServiceSettings, service: str) -> dict[str, int]:
    """Messages waiting in each existing dead-letter queue of `service`."""
    queues = await dead_letter_queues(settings, service)
    async with _broker(settings) as connection:
        return await _counts(connection, queues)


async def _counts(connection: AbstractRobustConnection, queues: list[str]) -> dict[str, int]:
    counts = {}
    for name in queues:
        async with _open(connection, name) as opened:
            if opened is not None:
                counts[name] = _ready(opened[1])
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
    async with _broker(settings) as connection:
        for name in queues:
            async with _open(connection, name) as opened:
                if opened is None:
                    continue
                _channel, queue = opened
                counts[name] = _ready(queue)
                async for message in _read(queue, max(0, min(limit - len(letters),
                                                              counts[name]))):
                    letters.append(describe(name, message))
    return Listing(letters, counts)


async def find_dead_letters(settings: ServiceSettings, message_id: str) -> list[DeadLetter]:
    """Every dead letter with this message id, in any dead-letter queue of the system.

    One event reaches every subscriber, so it can be dead-lettered in several services.
    """
    found: list[DeadLetter] = []
    queues = await system_dead_letter_queues(settings)
    async with _broker(settings) as connection:
        for name in queues:
            async with _open(connection, name) as opened:
                if opened is None:
                    continue
                _channel, queue = opened
                async for message in _read(queue, _ready(queue)):
                    if message.message_id == message_id:
                        found.append(describe(name, message))
    return found


async def replay(settings: ServiceSettings, service: str, *,
                 message_ids: Collection[str] | None) -> ReplayReport:
    """Send dead letters of `service` back to its queues: those with `message_ids`, or all
    (None).

    Each goes through the default exchange to the queue it failed in, with its attempts and
    failure headers reset, persistent, confirmed and mandatory; only then is the dead letter
    acked, and a DeliveryReceipt "replayed" published to the audit exchange. A message that
    fails again lands at the back of its dead-letter queue; it is not replayed twice, since
    each queue is read only as far as it held when the replay started.
    """
    queues = await dead_letter_queues(settings, service)
    wanted = None if message_ids is None else set(message_ids)
    report = ReplayReport()
    seen: set[str] = set()
    topology = Topology(settings.name_prefix)
    # Where each service has a broker user of its own, a replay is sent as the dead letter's
    # producer sent it, and its receipt as the service: consumers believe the broker's
    # user_id, not the body. Only a user tagged impersonator may (`shop broker setup`).
    owner = f"{settings.name_prefix}{service}" if await can_impersonate(settings) else None
    async with _broker(settings) as connection:
        publisher = Publisher(connection, topology)
        try:
            for name in queues:
                async with _open(connection, name) as opened:
                    if opened is None:
                        continue
                    _channel, queue = opened
                    async for message in _read(queue, _ready(queue)):
                        if wanted is not None and message.message_id not in wanted:
                            continue  # left unacked: back in its place when the channel closes
                        seen.add(message.message_id or "")
                        await _replay_one(publisher, service, describe(name, message), message,
                                          report, owner)
        finally:
            await publisher.close()
    report.not_found.extend(sorted((wanted or set()) - seen))
    return report


async def can_impersonate(settings: ServiceSettings) -> bool:
    """Whether our broker user may publish as another (the `impersonator` tag)."""
    api = ManagementApi.of(settings)
    try:
        async with api.client() as client:
            response = await client.get(api.path("whoami"))
            response.raise_for_status()
            tags = response.json().get("tags") or []
    except (httpx.HTTPError, ValueError):
        return False
    if isinstance(tags, str):  # 3.x may answer a comma-separated string
        tags = tags.split(",")
    return "impersonator" in tags


async def _replay_one(publisher: Publisher, service: str, letter: DeadLetter,
                      message: AbstractIncomingMessage, report: ReplayReport,
                      owner: str | None) -> None:
    sender = sender_of(message, owner) if owner is not None else None
    try:
        await publisher.publish_raw("", letter.original_queue, message.body,
                                    replay_headers(message.headers), message, user_id=sender)
    except Exception as exc:  # not confirmed or unroutable: the dead letter stays put
        report.failed.append((letter, f"{type(exc).__name__}: {exc}"))
        return
    await message.ack()
    report.replayed.append(letter)
    try:
        await publisher.publish(replay_receipt(letter, service, on_behalf=owner is not None),
                                user_id=owner)
    except Exception as exc:  # the replay itself is done; say the trace is missing
        report.receipt_errors.append(
            f"{letter.message_id}: the replayed receipt was not published "
            f"({type(exc).__name__}: {exc})")


async def purge(settings: ServiceSettings, service: str) -> dict[str, int]:
    """Delete every message waiting in the dead-letter queues of `service`; how many each."""
    queues = await dead_letter_queues(settings, service)
    purged: dict[str, int] = {}
    async with _broker(settings) as connection:
        for name in queues:
            async with _open(connection, name) as opened:
                if opened is None:
                    continue
                result = await opened[1].purge()
                purged[name] = int(result.message_count or 0)
    return purged


# --- small conversions --------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """A header or property value as JSON can carry it."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str | bytes):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _datetime(value: object) -> datetime | None:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


def _strip_dlq(name: str) -> str:
    return name.removesuffix(".dlq")


def _safe(url: str) -> str:
    parsed = URL(url)
    return str(parsed.with_password("***") if parsed.password else parsed)
