"""Expected vs actual: the broker's real topology, read and compared with the subscriber registry.

The management HTTP API gives every queue (ready, unacked, consumers, publish and deliver
rates) and each event exchange's bindings. When it cannot be reached that is said, and AMQP
passive declares stand in: counts and consumers only, for the queues asked about (no
bindings, no unacked, no rates). Nothing here prints: `shop queues`, `shop doctor` and the
order service's `GET /system` show what it finds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import certifi
import httpx
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity
from pydantic import BaseModel, ConfigDict, Field
from yarl import URL

from common.events import EVENT_TYPES, SubscriberAnnounced
from common.kit import discovery
from common.kit.broker import connect, safe_url
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology, history_of

Source = Literal["management API", "amqp"]
MANAGEMENT: Source = "management API"
AMQP: Source = "amqp"

#: A subscriber is stale when its last announcement is older than this many intervals.
STALE_AFTER_INTERVALS = 3

#: Queues whose counts the management API does not know yet that are asked for by AMQP,
#: at most, per look.
MAX_GAPS = 200

#: What the management API is asked for per queue (message_stats only exists once a queue
#: has seen traffic; rates_mode basic is enough for these two).
_QUEUE_COLUMNS = ",".join((
    "name", "messages_ready", "messages_unacknowledged", "consumers",
    "message_stats.publish_details.rate", "message_stats.deliver_get_details.rate"))


# --- which queues and exchanges -----------------------------------------------------------

def service_queues(prefix: str, name: str) -> list[str]:
    """An installed service's queues, from its declaration (and, for the service with the
    tracker, the audit queue)."""
    topology = Topology(prefix)
    service = discovery.service(name)
    queues = [topology.queue(service.name, cls) for cls in service.consumes]
    if service.tracked:
        queues.append(topology.audit_queue)
    return sorted(queues)


def system_queue_names(prefix: str) -> list[str]:
    """Every queue the installed services declare and consume."""
    return sorted({q for name in discovery.names() for q in service_queues(prefix, name)})


def event_exchanges(prefix: str) -> list[str]:
    """The fanout exchange of every business event (not the audit exchange)."""
    topology = Topology(prefix)
    return sorted({topology.exchange(cls) for cls in EVENT_TYPES.values()
                   if cls.routing != SubscriberAnnounced.routing})


def dead_letter_queue(queue: str) -> str:
    return Topology().dlq(queue)


# --- what the broker has ------------------------------------------------------------------

@dataclass(frozen=True)
class QueueStats:
    """One queue as the broker reports it; None where the source cannot tell."""

    name: str
    ready: int | None
    unacked: int | None
    consumers: int | None
    publish_rate: float | None = None
    deliver_rate: float | None = None


@dataclass(frozen=True)
class QueueRow:
    """A queue with its dead-letter depth beside it: a row of `shop queues`."""

    queue: str
    exists: bool
    ready: int | None
    unacked: int | None
    consumers: int | None
    dead_letters: int | None
    publish_rate: float | None
    deliver_rate: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"queue": self.queue, "ready": self.ready, "unacked": self.unacked,
                "consumers": self.consumers, "dead_letters": self.dead_letters,
                "exists": self.exists, "publish_rate": self.publish_rate,
                "deliver_rate": self.deliver_rate}


@dataclass(frozen=True)
class BrokerSnapshot:
    """What the broker said at one moment, and how it was asked."""

    source: Source
    #: The broker answered (through the management API or AMQP).
    reachable: bool
    #: Why the management API (or, when unreachable, the broker) did not answer.
    error: str | None
    queues: Mapping[str, QueueStats]
    #: Event exchange -> the queues bound to it; None when unknown (AMQP fallback).
    bindings: Mapping[str, tuple[str, ...]] | None
    #: `queues` holds every queue of the virtual host under the prefix (management API), not
    #: only those asked about.
    listed_all: bool
    taken_at: datetime

    def row(self, name: str) -> QueueRow:
        stats = self.queues.get(name)
        dlq = self.queues.get(dead_letter_queue(name))
        return QueueRow(
            queue=name, exists=stats is not None,
            ready=stats.ready if stats else None,
            unacked=stats.unacked if stats else None,
            consumers=stats.consumers if stats else None,
            dead_letters=dlq.ready if dlq else None,
            publish_rate=stats.publish_rate if stats else None,
            deliver_rate=stats.deliver_rate if stats else None)

    def rows(self, names: Iterable[str]) -> list[QueueRow]:
        return [self.row(name) for name in sorted(set(names))]

    def discovered(self, prefix: str) -> list[str]:
        """Consumed queues under `prefix` found on the broker: each has a dead-letter queue
        beside it, as the kit declares them (a subscriber service added later, say)."""
        return sorted(
            name for name in self.queues
            if name.startswith(prefix) and not name.endswith(".dlq")
            and (prefix or "." in name) and dead_letter_queue(name) in self.queues)


@dataclass(frozen=True)
class ManagementApi:
    """Where the management HTTP API is, with which credentials, for which virtual host."""

    base: str
    auth: tuple[str, str]
    vhost: str

    @classmethod
    def of(cls, settings: ServiceSettings) -> ManagementApi:
        url = URL(settings.management_url)
        return cls(base=str(url.with_user(None).with_password(None).with_query(None)
                            ).rstrip("/"),
                   auth=(url.user or "guest", url.password or "guest"),
                   vhost=URL(settings.amqp_url).path.lstrip("/") or "/")

    def client(self, timeout: float = 5.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(auth=self.auth, timeout=timeout, verify=_tls())

    def path(self, *parts: str) -> str:
        return "/".join([self.base, "api", *(quote(p, safe="") for p in parts)])


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every management API client: httpx builds (and loads the CA
    bundle into) a new one per client otherwise, some 20 to 40 ms each time."""
    return ssl.create_default_context(cafile=certifi.where())


async def management_queue_names(settings: ServiceSettings) -> list[str]:
    """Every queue name in the broker's virtual host, from the management HTTP API."""
    api = ManagementApi.of(settings)
    async with api.client() as client:
        response = await client.get(api.path("queues", api.vhost), params={"columns": "name"})
        response.raise_for_status()
        return [str(q["name"]) for q in response.json()]


def _rate(stats: Mapping[str, Any], key: str) -> float | None:
    details = stats.get(key)
    rate = details.get("rate") if isinstance(details, Mapping) else None
    return float(rate) if isinstance(rate, int | float) else None


async def read_management(client: httpx.AsyncClient, api: ManagementApi, prefix: str,
                          exchanges: Sequence[str]) -> BrokerSnapshot:
    """Every queue under `prefix` and the bindings of `exchanges`: 1 + len(exchanges) calls.

    Raises httpx.HTTPError (or ValueError for an answer that is not the API's JSON).
    """
    async def bound(exchange: str) -> tuple[str, tuple[str, ...]]:
        response = await client.get(api.path("exchanges", api.vhost, exchange, "bindings",
                                              "source"))
        if response.status_code == 404:  # the exchange was never declared: nothing bound
            return exchange, ()
        response.raise_for_status()
        return exchange, tuple(sorted(b["destination"] for b in response.json()
                                      if b.get("destination_type") == "queue"))

    listing, bindings = await asyncio.gather(
        client.get(api.path("queues", api.vhost), params={"columns": _QUEUE_COLUMNS}),
        asyncio.gather(*(bound(e) for e in exchanges)))
    response: httpx.Response = listing
    response.raise_for_status()
    queues: dict[str, QueueStats] = {}
    for q in response.json():
        name = str(q["name"])
        if not name.startswith(prefix):
            continue
        stats = q.get("message_stats") or {}
        queues[name] = QueueStats(
            name=name, ready=q.get("messages_ready"), unacked=q.get("messages_unacknowledged"),
            consumers=q.get("consumers"), publish_rate=_rate(stats, "publish_details"),
            deliver_rate=_rate(stats, "deliver_get_details"))
    return BrokerSnapshot(source=MANAGEMENT, reachable=True, error=None, queues=queues,
                          bindings=dict(bindings), listed_all=True, taken_at=datetime.now(UTC))


async def read_amqp(connection: AbstractConnection, names: Iterable[str], *,
                    error: str | None = None) -> BrokerSnapshot:
    """The queues `names` by passive declares: ready messages and consumers, no more.

    One channel serves every declare; a missing queue closes it (404), so another is opened.
    """
    queues: dict[str, QueueStats] = {}
    channel: AbstractChannel | None = None
    try:
        for name in sorted(set(names)):
            if channel is None or channel.is_closed:
                channel = await connection.channel()
            try:
                declared = await channel.declare_queue(name, passive=True)
            except ChannelNotFoundEntity:  # not found: the broker closed the channel
                channel = None
                continue
            result = declared.declaration_result
            queues[name] = QueueStats(name=name, ready=int(result.message_count or 0),
                                      unacked=None, consumers=int(result.consumer_count or 0))
    finally:
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
    return BrokerSnapshot(source=AMQP, reachable=True, error=error, queues=queues,
                          bindings=None, listed_all=False, taken_at=datetime.now(UTC))


async def read_broker(settings: ServiceSettings, queues: Iterable[str], *,
                      exchanges: Sequence[str] = (),
                      connection: AbstractConnection | None = None,
                      amqp_wait: float = 5.0, current: bool = False) -> BrokerSnapshot:
    """The broker's view: from the management API, or else from AMQP passive declares.

    `queues` are the queues the AMQP fallback asks about (each with its dead-letter queue);
    the management API lists every queue under the prefix anyway. The management API knows
    a new queue's counts only after its statistics interval (about 5 to 10 s): until then
    they are asked for by passive declare. With `current`, so are the counts of `queues`
    and their dead-letter queues whatever their age: the API's are as of its last refresh
    (a consumer that stopped seconds ago still shows), and a one-off check such as `shop
    doctor` must not pass, or fail, on them. `connection` serves the declares when given;
    otherwise one is opened for them and closed afterwards.
    """
    queues = list(queues)
    api = ManagementApi.of(settings)
    try:
        async with api.client() as client:
            snapshot = await read_management(client, api, settings.name_prefix, exchanges)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        error = (f"management API at {safe_url(settings.management_url)} not reachable ({why}); "
                 "using AMQP passive declares: no bindings, no unacked counts, no rates")
        names = [n for q in queues for n in (q, dead_letter_queue(q))]
        return await _declared(settings, connection, names, error, amqp_wait)
    stale = {q.name for q in snapshot.queues.values()
             if q.ready is None or q.consumers is None}
    if current:
        stale |= {n for q in queues for n in (q, dead_letter_queue(q)) if n in snapshot.queues}
    gaps = sorted(stale)[:MAX_GAPS]
    if not gaps:
        return snapshot
    filled = await _declared(settings, connection, gaps, None, amqp_wait)
    if not filled.reachable:
        return snapshot
    merged = dict(snapshot.queues)
    for name, stats in filled.queues.items():
        merged[name] = dataclasses.replace(merged[name], ready=stats.ready,
                                           consumers=stats.consumers)
    return dataclasses.replace(snapshot, queues=merged)


async def _declared(settings: ServiceSettings, connection: AbstractConnection | None,
                    names: list[str], error: str | None, wait: float) -> BrokerSnapshot:
    """`read_amqp` on `connection`, or on one opened for it."""
    if connection is not None and not connection.is_closed:
        return await read_amqp(connection, names, error=error)
    try:
        opened = await connect(settings.amqp_url, "shop-observe", wait=wait)
    except ConnectionError as exc:
        return BrokerSnapshot(source=AMQP, reachable=False,
                              error=f"{error}; and {exc}" if error else str(exc),
                              queues={}, bindings=None, listed_all=False,
                              taken_at=datetime.now(UTC))
    try:
        return await read_amqp(opened, names, error=error)
    finally:
        await opened.close()


# --- expected vs actual -------------------------------------------------------------------

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
    judge = snapshot.reachable
    stale_after = timedelta(seconds=STALE_AFTER_INTERVALS * announce_interval)
    owners = {q: s.name for s in registry or () for q in s.consumes.values()}

    subscribers: list[SubscriberView] = []
    for sub in sorted(registry or (), key=lambda s: s.name):
        views = []
        for event_type, queue in sorted(sub.consumes.items()):
            row = snapshot.row(queue)
            views.append(SubscriberQueue(queue=queue, exists=row.exists,
                                         consumers=row.consumers, ready=row.ready,
                                         unacked=row.unacked, dead_letters=row.dead_letters))
            if judge and not row.exists:
                problems.append(f"{sub.name}: its queue {queue} ({event_type}) does not exist "
                                "on the broker")
            elif judge and row.consumers == 0:
                problems.append(f"{sub.name}: its queue {queue} has no consumer "
                                f"({row.ready or 0} message(s) waiting)")
        stale = sub.last_seen is not None and now - sub.last_seen > stale_after
        if stale and sub.last_seen is not None:
            problems.append(
                f"{sub.name} is stale: last announced {_ago(now - sub.last_seen)} ago, more "
                f"than {STALE_AFTER_INTERVALS} x SHOP_ANNOUNCE_INTERVAL ({announce_interval:g} s)")
        subscribers.append(SubscriberView(name=sub.name, consumes=dict(sub.consumes),
                                          last_seen=sub.last_seen, stale=stale, queues=views))

    for queue in kit_queues:
        if queue in owners:
            continue
        row = snapshot.row(queue)
        if judge and not row.exists:
            problems.append(f"{queue} does not exist on the broker (has no service started "
                            "with this SHOP_NAME_PREFIX?)")
        elif judge and row.consumers == 0:
            problems.append(f"{queue} has no consumer ({row.ready or 0} message(s) waiting)")

    unannounced: list[UnannouncedQueue] = []
    if registry is not None and snapshot.bindings is not None:
        for exchange, queues in sorted(snapshot.bindings.items()):
            for queue in queues:
                if queue in owners or queue == history_of(exchange):
                    continue
                unannounced.append(UnannouncedQueue(queue=queue, exchange=exchange))
                problems.append(f"{queue} is bound to {exchange} but no subscriber "
                                "announced it: nobody tracks what it does with the events")

    names = set(owners) | set(kit_queues) | {u.queue for u in unannounced}
    if snapshot.listed_all:
        names |= set(snapshot.discovered(prefix))
    rows = snapshot.rows(names)
    for row in rows:
        if row.dead_letters:
            problems.append(
                f"{row.dead_letters} dead letter(s) waiting in {dead_letter_queue(row.queue)} "
                f"(shop dlq list {_owner(row.queue, prefix, owners)})")
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


def growing(samples: Iterable[int | None], over: int = 3) -> bool:
    """The backlog grew over the last `over` samples: it never fell and rose overall.

    Not "rose at each sample": the management API refreshes its counts every few seconds,
    so two samples in a row can be equal while messages pile up. An unknown sample (None)
    tells nothing.
    """
    recent = list(samples)[-over:]  # a deque has no slices
    last = [s for s in recent if s is not None]
    if len(last) < over:
        return False
    return all(a <= b for a, b in itertools.pairwise(last)) and last[-1] > last[0]


def sweep_prefix(management_url: str, prefix: str) -> int:
    """Delete every queue and exchange whose name starts with `prefix` through the management
    API (a test run's or a benchmark's names, delay and dead-letter queues included);
    returns how many. Without the management API it does nothing."""
    if not prefix:
        raise ValueError("refusing to sweep an empty prefix: it would match every queue")
    parts = urlsplit(management_url)
    auth = (parts.username or "guest", parts.password or "guest")
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}/api"
    deleted = 0
    try:
        with httpx.Client(auth=auth, timeout=5) as client:
            for kind in ("queues", "exchanges"):
                listing = client.get(f"{base}/{kind}", params={"columns": "name,vhost"})
                listing.raise_for_status()
                for item in listing.json():
                    if item["name"].startswith(prefix):
                        client.delete(f"{base}/{kind}/{quote(item['vhost'], safe='')}/"
                                      f"{quote(item['name'], safe='')}")
                        deleted += 1
    except httpx.HTTPError:
        return deleted
    return deleted
