"""What a dead-lettered message says about itself: why it failed, when, how often, and the
queue a replay sends it back to. Pure: it reads a message and touches no broker."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from aio_pika.abc import AbstractMessage

#: What a broker dead-lettering reason means to an operator (x-death "reason").
BROKER_REASONS = {
    "delivery_limit": "delivery limit: the consumer crashed or lost its connection on every "
                      "delivery",
    "rejected": "rejected by a consumer without requeue",
    "expired": "expired: its time to live ran out",
    "maxlen": "the queue's length limit was reached",
}


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
        attempts = as_int(headers.get("x-attempts"))
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
        replay_count=as_int(headers.get("x-replay-count")) or 0,
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


def as_int(value: object) -> int | None:
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


def _strip_dlq(name: str) -> str:
    return name.removesuffix(".dlq")
