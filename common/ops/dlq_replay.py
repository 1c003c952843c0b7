"""Dead letters sent back to their service's queue once the fault is fixed, or purged.

A replay acks a dead letter only after its copy back to the service's queue is confirmed
by the broker, and leaves a receipt saying so for the order's status.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from aio_pika.abc import AbstractIncomingMessage, HeadersType

from common.events import DeliveryReceipt
from common.kit.broker import Publisher, sender_of
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops.dead_letter import DeadLetter, as_int, describe
from common.ops.dlq import PRODUCER, connected, dead_letter_queues, open_queue, ready, unacked
from common.ops.observe import ManagementApi

#: Headers that describe a failure or a broker dead-lettering; a replayed copy starts
#: without them (the attempts are reset). x-original-exchange stays: it says where the event
#: was first published, which the default exchange used for the replay cannot tell.
FAILURE_HEADERS = frozenset({
    "x-attempts", "x-error-reason", "x-exception-type", "x-exception-message", "x-failed-at",
    "x-first-failed-at", "x-service", "x-original-queue",
    "x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
    "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason", "x-delivery-count",
})


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


def replay_headers(headers: HeadersType | None, now: datetime | None = None) -> HeadersType:
    """The headers of a replayed copy: attempts and failure reset, the replay counted."""
    old = dict(headers or {})
    new: dict[str, Any] = {k: v for k, v in old.items() if k not in FAILURE_HEADERS}
    new["x-replayed-at"] = (now or datetime.now(UTC)).isoformat()
    new["x-replay-count"] = (as_int(old.get("x-replay-count")) or 0) + 1
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
    async with connected(settings) as connection:
        publisher = Publisher(connection, topology)
        try:
            for name in queues:
                async with open_queue(connection, name) as opened:
                    if opened is None:
                        continue
                    _channel, queue = opened
                    async for message in unacked(queue, ready(queue)):
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
    async with connected(settings) as connection:
        for name in queues:
            async with open_queue(connection, name) as opened:
                if opened is None:
                    continue
                result = await opened[1].purge()
                purged[name] = int(result.message_count or 0)
    return purged


def _uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None
