"""The broker's real topology, read: its queues with their counts and rates, and what is bound
to each event exchange.

The management HTTP API gives every queue (ready, unacked, consumers, publish and deliver
rates) and each event exchange's bindings. When it cannot be reached that is said, and AMQP
passive declares stand in: counts and consumers only, for the queues asked about (no
bindings, no unacked, no rates). Nothing here prints: `shop queues`, `shop doctor` and the
order service's `GET /system` show what it finds (`common.ops.system_report` compares it
with the subscriber registry).
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
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import certifi
import httpx
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity
from yarl import URL

from common.events import EVENT_TYPES, SubscriberAnnounced
from common.kit import discovery
from common.kit.broker import connect, safe_url
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology

Source = Literal["management API", "amqp"]
MANAGEMENT: Source = "management API"
AMQP: Source = "amqp"

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
    """One TLS context for every management API client: otherwise httpx builds one per
    client and loads the whole CA bundle into it each time."""
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
