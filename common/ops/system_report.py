"""Expected vs actual: the subscriber registry and the kit's own queues against what the
broker has (`common.ops.observe` reads it), as `shop doctor` and `GET /system` report it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from common.kit.topology import history_of
from common.ops.observe import BrokerSnapshot, QueueRow, Source, dead_letter_queue

#: A subscriber is stale when its last announcement is older than this many intervals.
STALE_AFTER_INTERVALS = 3


@dataclass(frozen=True)
class Announced:
    """A registry entry as the comparison needs it."""

    name: str
    #: Event type -> the queue it is consumed from.
    consumes: Mapping[str, str]
    #: Its last announcement; None when not known (a registry made up from the handler
    #: tables because the order API did not answer).
    last_seen: datetime | None


class BrokerState(BaseModel):
    """How the broker was read."""

    model_config = ConfigDict(frozen=True)

    reachable: bool
    source: Source
    error: str | None = Field(description="Why the management API (or the broker) did not "
                                          "answer, when it did not.")


class SubscriberQueue(BaseModel):
    """One queue an announced subscriber consumes, as the broker has it."""

    model_config = ConfigDict(frozen=True)

    queue: str
    exists: bool
    consumers: int | None
    ready: int | None
    unacked: int | None
    dead_letters: int | None


class SubscriberView(BaseModel):
    """An announced subscriber: what it said it consumes, and what the broker shows of it."""

    model_config = ConfigDict(frozen=True)

    name: str
    consumes: dict[str, str]
    last_seen: datetime | None
    stale: bool = Field(description="Last announced more than 3 announce intervals ago.")
    queues: list[SubscriberQueue]


class UnannouncedQueue(BaseModel):
    """A queue bound to an event exchange that no subscriber announced."""

    model_config = ConfigDict(frozen=True)

    queue: str
    exchange: str


class QueueLine(BaseModel):
    """A queue of the system with its dead-letter depth and rates."""

    model_config = ConfigDict(frozen=True)

    queue: str
    exists: bool
    ready: int | None
    unacked: int | None
    consumers: int | None
    dead_letters: int | None
    publish_rate: float | None = Field(description="Messages per second into the queue.")
    deliver_rate: float | None = Field(description="Messages per second delivered from it.")


class SystemReport(BaseModel):
    """`GET /system`: the registry against the broker, dead letters and late orders."""

    model_config = ConfigDict(frozen=True)

    healthy: bool = Field(description="No problem found.")
    checked_at: datetime
    problems: list[str] = Field(description="Each thing that is wrong, in a sentence.")
    broker: BrokerState
    subscribers: list[SubscriberView]
    unannounced_queues: list[UnannouncedQueue]
    bindings_known: bool = Field(
        description="The bindings were read (management API), so unannounced queues would "
                    "show; false under the AMQP fallback.")
    queues: list[QueueLine]
    late_orders: int = Field(description="Orders with an expected subscriber late.")
    dead_letters: int = Field(description="Messages waiting in the dead-letter queues.")


def _ago(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 600:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def _owner(queue: str, prefix: str, owners: Mapping[str, str]) -> str:
    """The service a queue belongs to: from the registry, else its name's first part."""
    return owners.get(queue) or queue.removeprefix(prefix).split(".", 1)[0]


def compare(snapshot: BrokerSnapshot, registry: Sequence[Announced] | None, *,
            prefix: str, now: datetime, announce_interval: float, late_orders: int = 0,
            kit_queues: Sequence[str] = ()) -> SystemReport:
    """What is expected (the registry and the kit's own queues) against what the broker has.

    Reported: an announced subscriber whose queue is missing or has no consumer, a queue
    bound to an event exchange that nobody announced (its history stream aside), a
    subscriber whose announcements stopped (stale), dead letters waiting, late orders.
    `registry=None` means it is not known: only `kit_queues` are checked then, and
    unannounced queues cannot be told.
    """
    problems: list[str] = []
    if not snapshot.reachable:
        problems.append(f"the broker cannot be reached: {snapshot.error}")
    owners = {q: s.name for s in registry or () for q in s.consumes.values()}
    subscribers: list[SubscriberView] = []
    for sub in sorted(registry or (), key=lambda s: s.name):
        view, trouble = _subscriber(sub, snapshot, now=now,
                                    announce_interval=announce_interval)
        subscribers.append(view)
        problems += trouble
    problems += _kit_queue_problems(snapshot, [q for q in kit_queues if q not in owners])
    unannounced = _unannounced(snapshot, owners) if registry is not None else []
    problems += [f"{u.queue} is bound to {u.exchange} but no subscriber announced it: "
                 "nobody tracks what it does with the events" for u in unannounced]
    names = set(owners) | set(kit_queues) | {u.queue for u in unannounced}
    if snapshot.listed_all:
        names |= set(snapshot.discovered(prefix))
    rows = snapshot.rows(names)
    problems += _dead_letter_problems(rows, prefix, owners)
    if late_orders:
        problems.append(f"{late_orders} late order(s): an expected subscriber has not answered "
                        "in time (shop order list)")
    return SystemReport(
        healthy=not problems,
        checked_at=now,
        problems=problems,
        broker=BrokerState(reachable=snapshot.reachable, source=snapshot.source,
                           error=snapshot.error),
        subscribers=subscribers,
        unannounced_queues=unannounced,
        bindings_known=snapshot.bindings is not None,
        queues=[QueueLine(**row.as_dict()) for row in rows],
        late_orders=late_orders,
        dead_letters=sum(row.dead_letters or 0 for row in rows),
    )


def _subscriber(sub: Announced, snapshot: BrokerSnapshot, *, now: datetime,
                announce_interval: float) -> tuple[SubscriberView, list[str]]:
    """An announced subscriber as the broker shows it, and what is wrong with it: a queue
    missing or without a consumer, announcements that stopped."""
    problems: list[str] = []
    views = []
    for event_type, queue in sorted(sub.consumes.items()):
        row = snapshot.row(queue)
        views.append(SubscriberQueue(queue=queue, exists=row.exists, consumers=row.consumers,
                                     ready=row.ready, unacked=row.unacked,
                                     dead_letters=row.dead_letters))
        if snapshot.reachable and not row.exists:
            problems.append(f"{sub.name}: its queue {queue} ({event_type}) does not exist "
                            "on the broker")
        elif snapshot.reachable and row.consumers == 0:
            problems.append(f"{sub.name}: its queue {queue} has no consumer "
                            f"({row.ready or 0} message(s) waiting)")
    stale_after = timedelta(seconds=STALE_AFTER_INTERVALS * announce_interval)
    stale = sub.last_seen is not None and now - sub.last_seen > stale_after
    if stale and sub.last_seen is not None:
        problems.append(
            f"{sub.name} is stale: last announced {_ago(now - sub.last_seen)} ago, more "
            f"than {STALE_AFTER_INTERVALS} x SHOP_ANNOUNCE_INTERVAL ({announce_interval:g} s)")
    view = SubscriberView(name=sub.name, consumes=dict(sub.consumes), last_seen=sub.last_seen,
                          stale=stale, queues=views)
    return view, problems


def _kit_queue_problems(snapshot: BrokerSnapshot, queues: Iterable[str]) -> list[str]:
    """The kit's own queues (the tracker's audit queue) that are missing or unconsumed."""
    if not snapshot.reachable:
        return []
    problems = []
    for queue in queues:
        row = snapshot.row(queue)
        if not row.exists:
            problems.append(f"{queue} does not exist on the broker (has no service started "
                            "with this SHOP_NAME_PREFIX?)")
        elif row.consumers == 0:
            problems.append(f"{queue} has no consumer ({row.ready or 0} message(s) waiting)")
    return problems


def _unannounced(snapshot: BrokerSnapshot, owners: Mapping[str, str]) -> list[UnannouncedQueue]:
    """Queues bound to an event exchange that no subscriber announced (the exchange's own
    history stream aside); none when the bindings are not known."""
    return [UnannouncedQueue(queue=queue, exchange=exchange)
            for exchange, queues in sorted((snapshot.bindings or {}).items())
            for queue in queues if queue not in owners and queue != history_of(exchange)]


def _dead_letter_problems(rows: Iterable[QueueRow], prefix: str, owners: Mapping[str, str]
                          ) -> list[str]:
    return [f"{row.dead_letters} dead letter(s) waiting in {dead_letter_queue(row.queue)} "
            f"(shop dlq list {_owner(row.queue, prefix, owners)})"
            for row in rows if row.dead_letters]
