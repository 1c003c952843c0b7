"""The subscriber runner: decode, dedupe, handle, commit, ack, receipt; and a service's life."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Generic

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.events import (
    KIT_EVENTS,
    DeliveryReceipt,
    DeliveryReceipts,
    Event,
    SubscriberAnnounced,
    receipts_of,
)
from common.kit.allocator import return_freed_memory, trim_forever
from common.kit.broker import ORIGINAL_USER, Publisher, connect, instance_name, sender_of
from common.kit.commit import GroupCommit
from common.kit.db import create_tables, is_sqlite, make_engine
from common.kit.logging import delivery_context, get_logger
from common.kit.outbox import (
    KIT_LATER_INDEXES,
    RECEIPTS_PER_MESSAGE,
    Relay,
    add_to_outbox,
    claim,
    kit_metadata,
    utcnow,
)
from common.kit.service import Handler, RejectedError, ServiceSpec, StoreT
from common.kit.settings import ServiceSettings
from common.kit.telemetry import (
    DELIVERIES,
    HANDLER_SECONDS,
    configure_tracing,
    current_trace_headers,
    process_span,
    start_metrics_server,
    trace_headers_of,
    tracing_active,
)
from common.kit.topology import Topology, TopologyError

log = get_logger(__name__)

Work = Callable[[AsyncConnection], Awaitable[Sequence[Event]]]


class PoisonMessageError(RejectedError):
    """A delivery no retry can fix: too large, not JSON, not the event's schema, unknown type."""

    def __init__(self, detail: str) -> None:
        super().__init__("poison", detail)


class MessageTooLargeError(PoisonMessageError):
    """A body over `SHOP_MAX_MESSAGE_BYTES`, refused before it is parsed."""


@dataclass(frozen=True)
class Subscription(Generic[StoreT]):
    """One queue a service consumes, and the handler for each event type it carries."""

    queue: str
    handlers: Mapping[str, tuple[type[Event], Handler[StoreT]]]
    #: Receipts go to the audit trail for business events, never for the audit queue itself
    #: (a receipt about a receipt would loop).
    receipts: bool = True


def decode(message: AbstractIncomingMessage,
           handlers: Mapping[str, tuple[type[Event], Handler[Any]]], *,
           max_bytes: int | None = None) -> tuple[Event, Handler[Any]]:
    """The event in a delivery and its handler, or PoisonMessageError saying what is wrong.

    Checks on the delivery come first, before a byte of the body is parsed. Then whatever
    reading the body raises is poison for this one delivery, never an error that escapes to
    its batch: `json.loads` raises RecursionError on deep nesting and ValueError on a number
    of thousands of digits, and a model's validator may raise anything.
    """
    size = len(message.body)
    if max_bytes is not None and size > max_bytes:
        raise MessageTooLargeError(f"body is {size:,} bytes, over the limit of "
                                   f"{max_bytes:,} bytes (SHOP_MAX_MESSAGE_BYTES)")
    known = handlers.get(message.type or "")
    if known is not None:
        # The usual case, in one pass of pydantic's JSON parser; the slow path below only
        # runs to say what is wrong with a body that does not fit.
        with contextlib.suppress(Exception):
            return known[0].model_validate_json(message.body), known[1]
    try:
        return _diagnose(message, handlers)
    except PoisonMessageError:
        raise
    except Exception as exc:  # a validator's own exception, say: still this body's fault
        raise PoisonMessageError(
            f"body could not be read: {type(exc).__name__}: {exc}") from exc


def _diagnose(message: AbstractIncomingMessage,
              handlers: Mapping[str, tuple[type[Event], Handler[Any]]]
              ) -> tuple[Event, Handler[Any]]:
    """The slow path of `decode`: parse the body step by step to say where it goes wrong."""
    try:
        payload = json.loads(message.body)
    except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 and bad JSON
        raise PoisonMessageError(f"body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise PoisonMessageError(f"body is JSON {type(payload).__name__}, not an object")
    event_type = payload.get("event_type") or message.type
    if not isinstance(event_type, str) or event_type not in handlers:
        raise PoisonMessageError(f"unknown event type {event_type!r} on this queue "
                                 f"(expected one of {', '.join(sorted(handlers))})")
    cls, handler = handlers[event_type]
    try:
        return cls.model_validate(payload), handler
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}"
                           for e in exc.errors()[:10])
        raise PoisonMessageError(f"does not match {event_type} schema v"
                                 f"{payload.get('schema_version', '?')}: {errors}") from exc


class Runtime(Generic[StoreT]):
    """A running service: its database, topology and relay, for its handlers and extras."""

    def __init__(self, spec: ServiceSpec[StoreT], settings: ServiceSettings,
                 engine: AsyncEngine, topology: Topology) -> None:
        self.spec = spec
        self.settings = settings
        self.engine = engine
        self.topology = topology
        self.connection: AbstractRobustConnection | None = None
        self.publisher: Publisher | None = None
        self.relay: Relay | None = None
        self.instance = instance_name(spec.name)
        self._produces = frozenset({*spec.produces, *KIT_EVENTS})
        # SQLite has one writer at a time: serialise our own writers instead of letting them
        # fail with "database is locked"; PostgreSQL needs no such lock.
        self.write_lock = asyncio.Lock() if is_sqlite(engine) else _NullLock()
        #: Transactions queued behind that lock share a commit (see common.kit.commit).
        self.commits = GroupCommit(engine, self.write_lock, service=spec.name)

    async def execute(self, work: Work, traces: Mapping[uuid.UUID, str] | None = None
                      ) -> list[Event]:
        """Run `work` in one transaction, store its events in the outbox, commit, publish.

        The transaction may be shared with others queued at the same time (group commit):
        `work` must be safe to run again, since it is if the group fails.

        `traces` (filled by `work` as it runs, for a batch of deliveries) gives an event the
        trace context it was produced in; the others get the current one.
        """
        async def unit(conn: AsyncConnection) -> list[Event]:
            events = [self._stamp(e) for e in await work(conn)]
            await add_to_outbox(conn, events, self.instance, traces)
            return events

        events = await self.commits.run(unit)
        if self.relay is not None:
            self.relay.wake()
        return events

    def _stamp(self, event: Event) -> Event:
        if type(event) not in self._produces:
            # Here, not at the broker: a user of its own would be refused the publish, and
            # the event would wait in the outbox forever.
            raise TypeError(f"{self.spec.name} produced {event.event_type}, which its "
                            f"ServiceSpec does not list in `produces`")
        if event.producer:
            return event
        return event.model_copy(update={"producer": self.spec.name})

    def broker_ok(self) -> bool:
        # A robust connection is not "closed" while it reconnects; `connected` says whether
        # it is up right now.
        c = self.connection
        return c is not None and not c.is_closed and c.connected.is_set()

    async def db_ok(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:  # any failure means "not healthy"; the caller reports it
            return False
        return True


class _NullLock:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


class ServiceRunner(Generic[StoreT]):
    """Starts a service (tables, topology, consumers, relay, announcer) and stops it cleanly."""

    def __init__(self, spec: ServiceSpec[StoreT], settings: ServiceSettings, *,
                 broker_wait: float | None = None, shutdown_timeout: float | None = None
                 ) -> None:
        if settings.authenticated and settings.service_name != spec.name:
            # Its broker user is named after the settings, its grant after the spec.
            raise ValueError(f"service {spec.name!r} runs with the settings of "
                             f"{settings.service_name!r}: give it a settings class whose "
                             f"service_name is {spec.name!r}")
        self.spec = spec
        self.settings = settings
        self.topology = Topology.of(settings)
        self.broker_wait = broker_wait
        self.shutdown_timeout = shutdown_timeout or settings.shutdown_timeout
        self.runtime = Runtime(spec, settings, make_engine(settings.db_url()), self.topology)
        self.subscriptions = self._subscriptions()
        #: Per subscribed queue: the channel, the queue object and our consumer tag.
        self._consumers: dict[str, tuple[AbstractChannel, AbstractQueue, str]] = {}
        self._in_flight: set[asyncio.Task[Any]] = set()
        #: Per queue: deliveries waiting for its drainer, and the drainer while it runs.
        self._pending: dict[str, list[AbstractIncomingMessage]] = {}
        self._drainers: dict[str, asyncio.Task[None]] = {}
        #: At most this many deliveries share a transaction: half the prefetch, so the next
        #: batch arrives while this one is handled.
        self.batch_size = max(1, settings.prefetch // 2)
        self.linger = settings.batch_linger_ms / 1000
        self._tasks: list[asyncio.Task[Any]] = []
        self._instance = self.runtime.instance

    def _subscriptions(self) -> list[Subscription[StoreT]]:
        subs = [
            Subscription(self.topology.queue(self.spec.name, cls),
                         {cls.model_fields["event_type"].default: (cls, handler)})
            for cls, handler in self.spec.handlers.items()
        ]
        if self.spec.audit_handlers:
            subs.append(Subscription(
                self.topology.audit_queue,
                {cls.model_fields["event_type"].default: (cls, handler)
                 for cls, handler in self.spec.audit_handlers.items()},
                receipts=False))
        return subs

    async def __aenter__(self) -> Runtime[StoreT]:
        rt = self.runtime
        await create_tables(rt.engine, kit_metadata, self.spec.metadata,
                            indexes=KIT_LATER_INDEXES)
        if self.spec.on_start is not None:
            await self.spec.on_start(rt.engine)
        rt.connection = await connect(self.settings.amqp_url, self._instance,
                                      wait=self.broker_wait)
        rt.publisher = Publisher(rt.connection, self.topology, self.spec.name)
        rt.relay = Relay(rt.engine, rt.publisher, commits=rt.commits,
                         retention=timedelta(hours=self.settings.retention_hours),
                         service=self.spec.name, instance=rt.instance)
        await self._declare_audit()
        for cls in self.spec.produces:
            await rt.publisher.event_exchange(cls)
        for sub in self.subscriptions:
            await self._consume(sub)
        self._tasks.append(asyncio.create_task(rt.relay.run(), name=f"{self.spec.name}-relay"))
        self._tasks.append(asyncio.create_task(self._watch_consumers(),
                                               name=f"{self.spec.name}-consumer-watch"))
        if self.spec.handlers:
            self._tasks.append(asyncio.create_task(self._announce_forever(),
                                                   name=f"{self.spec.name}-announcer"))
        log.info("service started", queues=[s.queue for s in self.subscriptions],
                 prefetch=self.settings.prefetch)
        return rt

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    def _connection(self) -> AbstractRobustConnection:
        if self.runtime.connection is None:
            raise RuntimeError("the service is not started")
        return self.runtime.connection

    async def _declare_audit(self) -> None:
        """The audit exchange, and the tracker's queue so that receipts and announcements
        are kept even before the tracker first runs. A service with a broker user of its
        own may not declare another's queue: `shop broker setup` declares it then."""
        channel = await self._connection().channel()
        exchange = await self.topology.declare_event_exchange(channel, SubscriberAnnounced)
        if not self.settings.authenticated:
            await self.topology.declare_subscriber_queue(channel, self.topology.audit_queue,
                                                         exchange)
        await channel.close()

    async def _consume(self, sub: Subscription[StoreT]) -> None:
        channel = await self._connection().channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        # Declare and bind before consuming, so nothing published from now on is missed.
        event_classes = {cls for cls, _ in sub.handlers.values()}
        queue: AbstractQueue | None = None
        for cls in event_classes:
            exchange = await self.topology.declare_event_exchange(channel, cls)
            queue = await self.topology.declare_subscriber_queue(channel, sub.queue, exchange)
        if queue is None:
            raise ValueError(f"subscription {sub.queue} has no handlers")
        tag = await queue.consume(functools.partial(self._on_message, sub))
        self._consumers[sub.queue] = (channel, queue, tag)

    async def _watch_consumers(self) -> None:
        """Re-subscribe a queue the broker says has no consumer while we think we consume it.

        aio-pika has open reports of a robust reconnect that restores the channel but not
        the consumer (mosquito/aio-pika#231, #626): check instead of trusting it. Two
        readings in a row, so a restore still in progress is not mistaken for a loss.
        """
        suspects: set[str] = set()
        by_queue = {sub.queue: sub for sub in self.subscriptions}
        while True:
            await asyncio.sleep(self.settings.consumer_check_interval)  # a period, not a wait
            connection = self.runtime.connection
            if connection is None or connection.is_closed or not self._consumers:
                continue
            try:
                counts = await self._consumer_counts(connection, list(self._consumers))
            except Exception as exc:  # the broker is away; the robust connection handles it
                log.debug("consumer check skipped", error=str(exc))
                continue
            for name, count in counts.items():
                if count > 0:
                    suspects.discard(name)
                elif name not in suspects:
                    suspects.add(name)
                else:
                    suspects.discard(name)
                    log.warning("queue has no consumer although we subscribed; re-subscribing",
                                queue=name)
                    old_channel = self._consumers[name][0]
                    with contextlib.suppress(Exception):
                        await old_channel.close()
                    try:
                        await self._consume(by_queue[name])
                    except Exception:
                        log.exception("re-subscribing failed; will try again", queue=name)

    @staticmethod
    async def _consumer_counts(connection: AbstractRobustConnection,
                               queues: list[str]) -> dict[str, int]:
        channel = await connection.channel()
        try:
            counts = {}
            for name in queues:
                declared = await channel.declare_queue(name, passive=True)
                result = declared.declaration_result
                counts[name] = int(result.consumer_count or 0)
            return counts
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _on_message(self, sub: Subscription[StoreT], message: AbstractIncomingMessage
                          ) -> None:
        """Queue the delivery for its queue's drainer and return at once.

        Deliveries that arrive while a batch is being handled, or within the linger
        (`SHOP_BATCH_LINGER_MS`) of the first, are handled together: one transaction, one
        receipt message and one ack for up to `batch_size` of them. At a trickle a batch is
        one delivery that waited the linger.
        """
        pending = self._pending.setdefault(sub.queue, [])
        pending.append(message)
        drainer = self._drainers.get(sub.queue)
        if drainer is None or drainer.done():
            drainer = asyncio.create_task(self._drain(sub, pending),
                                          name=f"{self.spec.name}-drain-{sub.queue}")
            self._drainers[sub.queue] = drainer
            self._in_flight.add(drainer)
            drainer.add_done_callback(self._in_flight.discard)

    async def _drain(self, sub: Subscription[StoreT],
                     pending: list[AbstractIncomingMessage]) -> None:
        while pending:
            # Let deliveries already read off the socket join this batch: yield to the loop
            # while that makes the batch grow. No timer: a lone delivery does not wait.
            idle = 0
            while len(pending) < self.batch_size and idle < _BATCH_IDLE_YIELDS:
                before = len(pending)
                await asyncio.sleep(0)
                idle = idle + 1 if len(pending) == before else 0
            if self.linger and len(pending) < self.batch_size:
                # Then wait a few milliseconds for more (as Kafka's linger.ms): the
                # deliveries of a burst arrive spread over milliseconds, and each one
                # handled alone pays a transaction, a flush and a receipt message. In the
                # bench this took the system from 64-74 to 85-94 orders/s over HTTP.
                await asyncio.sleep(self.linger)
            batch = pending[:self.batch_size]
            del pending[:len(batch)]
            try:
                await self._deliver_batch(sub, batch)
            except Exception:
                # A bug of ours outside any one delivery's path. Returning the whole batch
                # to the queue would send deliveries that are fine round with it, again and
                # again, until the broker's delivery limit parks them all with no receipt:
                # the ones not settled yet go their own way instead. (The batch's `multiple`
                # ack is its last step and never raises, so `processed` is true exactly of
                # the settled ones.)
                log.exception("could not settle a batch; settling its deliveries one by one",
                              queue=sub.queue, size=len(batch))
                for message in batch:
                    if not message.processed:
                        await self._deliver_alone(sub, message)

    async def _deliver_batch(self, sub: Subscription[StoreT],
                             messages: Sequence[AbstractIncomingMessage]) -> None:
        """Handle deliveries of one queue in one transaction, in their order, then ack them.

        Each delivery's fate is its own; only the transaction is shared. A delivery that
        cannot be decoded goes to its dead-letter queue on its own. If any handler of the
        batch fails (or a replica committed one of its events first) nothing of the batch
        was committed, and each delivery is handled again on its own, so a failure retries
        or parks only its own delivery. The ack comes last, once nothing else can fail: a
        delivery is settled by it or by its own path, never by both.
        """
        if len(messages) == 1:
            await self._deliver_alone(sub, messages[0])
            return
        started = time.perf_counter()
        received_at = utcnow()
        decoded: list[tuple[AbstractIncomingMessage, Event, Handler[StoreT]]] = []
        for message in messages:
            try:
                event, handler = self._decode(sub, message)
            except RejectedError as exc:
                await self._deliver_alone(sub, message, poison=exc)
                continue
            decoded.append((message, event, handler))
        if not decoded:
            return
        try:
            outcomes = await self._handle_batch(sub, decoded, received_at, started)
        except Exception as exc:  # each delivery on its own now, with its own outcome
            log.info("batch not committed; handling its deliveries one by one",
                     queue=sub.queue, size=len(decoded),
                     error=f"{type(exc).__name__}: {exc}"[:500])
            for message, _event, _handler in decoded:
                await self._deliver_alone(sub, message)
            return
        elapsed = time.perf_counter() - started
        counts = Counter((event.event_type, outcome)
                         for (_message, event, _handler), outcome in zip(decoded, outcomes,
                                                                         strict=True))
        for (event_type, outcome), count in counts.items():
            DELIVERIES.labels(self.spec.name, sub.queue, event_type, outcome).inc(count)
            # Each delivery of the batch waited for all of it: one observation each.
            seconds = HANDLER_SECONDS.labels(self.spec.name, event_type)
            for _ in range(count):
                seconds.observe(elapsed)
        log.debug("batch handled", queue=sub.queue, size=len(decoded),
                  duration_ms=round(elapsed * 1000, 2))
        await _ack_all([m for m, _, _ in decoded])

    def _decode(self, sub: Subscription[StoreT], message: AbstractIncomingMessage
                ) -> tuple[Event, Handler[StoreT]]:
        """The event in a delivery and its handler, with this service's limits; where every
        service has a broker user of its own, with the producer the broker vouches for."""
        event, handler = decode(message, sub.handlers, max_bytes=self.settings.max_message_bytes)
        if self.settings.authenticated:
            event = self._authenticate(event, message)
        return event, handler

    def _authenticate(self, event: Event, message: AbstractIncomingMessage) -> Event:
        """`event` with the producer the broker validated (`common.ops.access`), or RejectedError.

        The body's `producer` is a claim the sender fills in; the message's `user_id` is
        checked by the broker against the connection that published it. A receipt or an
        announcement must also be about its own producer: every service may write to the
        audit exchange, so that is where one would speak for another.
        """
        sender = sender_of(message, self.settings.broker_user)
        prefix = self.settings.name_prefix
        producer = sender[len(prefix):] if sender and sender.startswith(prefix) else None
        if not producer or (event.producer and event.producer != producer):
            raise RejectedError("forged_producer",
                           f"{event.event_type} says it comes from {event.producer!r}, but the "
                           f"broker says it was published by user {sender!r}")
        claims = {r.subscriber for r in receipts_of(event)}
        if isinstance(event, DeliveryReceipts | SubscriberAnnounced):
            claims.add(event.subscriber)
        if claims - {producer}:
            raise RejectedError("forged_producer",
                           f"{event.event_type} from {producer!r} speaks for "
                           f"{', '.join(sorted(claims - {producer}))}")
        return event if event.producer == producer else event.model_copy(
            update={"producer": producer})

    async def _handle_batch(self, sub: Subscription[StoreT],
                            decoded: Sequence[tuple[AbstractIncomingMessage, Event,
                                                    Handler[StoreT]]],
                            received_at: datetime, started: float) -> list[str]:
        """The effects, dedupe records, outgoing events and one receipts message of a batch:
        one commit. Returns each delivery's outcome (handled or duplicate)."""
        traces: dict[uuid.UUID, str] = {}
        outcomes: list[str] = []
        tracing = tracing_active()

        async def work(conn: AsyncConnection) -> Sequence[Event]:
            outcomes.clear()
            traces.clear()
            ids = [str(event.event_id) for _, event, _ in decoded]
            # Dedupe records first, as a single delivery does (see `claim`); the audit
            # queue's handlers are idempotent and keep no records.
            fresh = await claim(conn, sub.queue, ids) if sub.receipts else set(ids)
            produced: list[Event] = []
            receipts: list[DeliveryReceipt] = []
            for (message, event, handler), event_id in zip(decoded, ids, strict=True):
                if event_id not in fresh:  # handled before, or earlier in this batch
                    outcomes.append("duplicate")
                    receipts.append(self._receipt(sub, event, "duplicate", None, received_at,
                                                  started))
                    continue
                fresh.discard(event_id)
                with (process_span(sub.queue, message.message_id, message.type,
                                   self.spec.name, message.headers)
                      if tracing else contextlib.nullcontext()), \
                        delivery_context(
                            event_id=event_id, event_type=event.event_type,
                            correlation_id=event.correlation_id, order_id=event.order_key):
                    out = [e.caused(event, self.spec.name)
                           for e in await handler(event, self.spec.store(conn))]
                    # Without an SDK, the incoming context goes on as it came.
                    headers = (current_trace_headers() if tracing
                               else trace_headers_of(message.headers)) if out else None
                    if headers:
                        context = json.dumps(headers)
                        traces.update((e.event_id, context) for e in out)
                produced.extend(out)
                outcomes.append("handled")
                if sub.receipts:
                    receipts.append(self._receipt(sub, event, "handled", None, received_at,
                                                  started))
            if sub.receipts:
                produced.extend(await self._keep_receipts(conn, sub, receipts))
            return produced

        await self.runtime.execute(work, traces)
        return outcomes

    async def _deliver_alone(self, sub: Subscription[StoreT], message: AbstractIncomingMessage,
                             poison: RejectedError | None = None) -> None:
        """Handle one delivery on its own; never raises.

        Should settling it fail all the same (a bug of ours, a channel gone), only this
        delivery goes back to its queue: the broker's delivery limit is its backstop, and
        the deliveries around it are not sent round with it.
        """
        try:
            await self._deliver(sub, message, poison)
        except Exception:
            log.exception("could not settle a delivery; returning it to its queue",
                          queue=sub.queue, event_id=message.message_id)
            with contextlib.suppress(Exception):  # already settled, or its channel is gone
                await message.nack(requeue=True)

    async def _deliver(self, sub: Subscription[StoreT], message: AbstractIncomingMessage,
                       poison: RejectedError | None = None) -> None:
        with process_span(sub.queue, message.message_id, message.type, self.spec.name,
                          message.headers):
            outcome = await self._deliver_traced(sub, message, poison)
        event_type = message.type or "unknown"
        DELIVERIES.labels(self.spec.name, sub.queue, event_type, outcome).inc()

    async def _deliver_traced(self, sub: Subscription[StoreT], message: AbstractIncomingMessage,
                              poison: RejectedError | None) -> str:
        """Handle one delivery (`poison`: why it was found unreadable already); returns its
        outcome for the metrics."""
        started = time.perf_counter()
        received_at = utcnow()
        if poison is None:
            try:
                event, handler = self._decode(sub, message)
            except RejectedError as exc:
                poison = exc
        if poison is not None:
            with delivery_context(
                    event_id=message.message_id, event_type=message.type,
                    correlation_id=message.correlation_id, order_id=message.correlation_id):
                return await self._fail(sub, message, reason=poison.reason, error=poison,
                                        retry=False, received_at=received_at, started=started)
        with delivery_context(
                event_id=str(event.event_id), event_type=event.event_type,
                correlation_id=event.correlation_id, order_id=event.order_key):
            try:
                duplicate = await self._handle(sub, event, handler, received_at, started)
            except RejectedError as exc:  # the handler's rules refuse it: no retry can help
                log.warning("event rejected", queue=sub.queue, reason=exc.reason,
                            error=str(exc)[:500])
                return await self._fail(sub, message, reason=exc.reason, error=exc,
                                        retry=False, received_at=received_at, started=started,
                                        event=event)
            except Exception as exc:  # any handler failure: retry later or park; keep consuming
                log.exception("handler failed", queue=sub.queue)
                return await self._fail(sub, message, reason="handler_error", error=exc,
                                        retry=True, received_at=received_at, started=started,
                                        event=event)
            await message.ack()
            elapsed = time.perf_counter() - started
            HANDLER_SECONDS.labels(self.spec.name, event.event_type).observe(elapsed)
            log.debug("delivery handled", queue=sub.queue, duplicate=duplicate,
                      duration_ms=round(elapsed * 1000, 2))
            return "duplicate" if duplicate else "handled"

    async def _handle(self, sub: Subscription[StoreT], event: Event, handler: Handler[StoreT],
                      received_at: datetime, started: float) -> bool:
        """The effect, the dedupe record, the outgoing events and the receipt: one commit."""
        rt = self.runtime
        event_id = str(event.event_id)
        duplicate = False

        async def work(conn: AsyncConnection) -> Sequence[Event]:
            nonlocal duplicate
            duplicate = False
            if sub.receipts and not await claim(conn, sub.queue, [event_id]):
                duplicate = True
                return await self._keep_receipts(conn, sub, [self._receipt(
                    sub, event, "duplicate", None, received_at, started)])
            produced = [e.caused(event, self.spec.name)
                        for e in await handler(event, self.spec.store(conn))]
            if sub.receipts:
                produced.extend(await self._keep_receipts(conn, sub, [self._receipt(
                    sub, event, "handled", None, received_at, started)]))
            return produced

        try:
            await rt.execute(work)
        except IntegrityError:
            # A competing replica committed the same event first (the inbox's key): the
            # effect exists once; this delivery is a duplicate.
            if not sub.receipts:
                raise
            duplicate = True
            await rt.execute(self._receipts_work(sub, [self._receipt(
                sub, event, "duplicate", None, received_at, started)]))
        return duplicate

    async def _keep_receipts(self, conn: AsyncConnection, sub: Subscription[StoreT],
                             receipts: Sequence[DeliveryReceipt]) -> list[Event]:
        """The receipts to publish with the transaction's other events: one message for a
        batch (of up to RECEIPTS_PER_MESSAGE, which keeps it far below any subscriber's
        SHOP_MAX_MESSAGE_BYTES). A service that keeps receipts itself (the tracker) stores
        its own in this transaction instead: a message to itself would only cost a round
        trip."""
        if not receipts:
            return []
        if self.spec.keep_receipts is not None:
            await self.spec.keep_receipts(self.spec.store(conn), receipts)
            return []
        if len(receipts) == 1:
            return [receipts[0]]
        return [DeliveryReceipts(subscriber=self.spec.name, queue=sub.queue,
                                 receipts=tuple(receipts[i:i + RECEIPTS_PER_MESSAGE]),
                                 producer=self.spec.name)
                for i in range(0, len(receipts), RECEIPTS_PER_MESSAGE)]

    def _receipts_work(self, sub: Subscription[StoreT],
                       receipts: Sequence[DeliveryReceipt]) -> Work:
        async def work(conn: AsyncConnection) -> Sequence[Event]:
            return await self._keep_receipts(conn, sub, receipts)

        return work

    def _receipt(self, sub: Subscription[StoreT], event: Event | None, outcome: str,
                 error: str | None, received_at: datetime, started: float,
                 message: AbstractIncomingMessage | None = None, attempt: int | None = None
                 ) -> DeliveryReceipt:
        correlation = event.correlation_id if event else (
            # A malformed message's own correlation id may be anything; the receipt's field
            # is bounded, so keep what fits rather than lose the receipt.
            (message.correlation_id or "")[:128] or None if message else None)
        return DeliveryReceipt(
            subscriber=self.spec.name,
            queue=sub.queue,
            handled_event_id=str(event.event_id) if event else (
                message.message_id if message else None),
            handled_event_type=event.event_type if event else (message.type if message
                                                               else None),
            outcome=outcome,  # type: ignore[arg-type]
            error=error,
            received_at=received_at,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            attempt=attempt,
            correlation_id=correlation,
            causation_id=event.event_id if event else None,
            producer=self.spec.name,
        )

    async def _fail(self, sub: Subscription[StoreT], message: AbstractIncomingMessage, *,
                    reason: str, error: BaseException, retry: bool, received_at: datetime,
                    started: float, event: Event | None = None) -> str:
        """Send a failed delivery, as received, to its next delay queue or to `<queue>.dlq`.

        The broker does the waiting (a delay queue dead-letters back into the queue when its
        TTL expires), so a handler never sleeps. The attempt count travels in our own
        `x-attempts` header: `x-death` counts changed in RabbitMQ 3.13. Only after the copy
        is confirmed is the delivery acked; if it cannot be, the delivery is returned to
        its queue instead, so there is always one copy somewhere.
        """
        rt = self.runtime
        if rt.publisher is None:
            raise RuntimeError("the service is not started")
        now = utcnow().isoformat()
        old = dict(message.headers or {})
        attempts = _int(old.get("x-attempts")) + 1
        headers: dict[str, Any] = {k: v for k, v in old.items() if k not in _BROKER_HEADERS}
        headers.update({
            "x-error-reason": reason,
            "x-exception-type": type(error).__name__,
            "x-exception-message": str(error)[:2000],
            "x-failed-at": now,
            "x-first-failed-at": old.get("x-first-failed-at") or now,
            "x-service": self.spec.name,
            "x-original-queue": sub.queue,
            "x-original-exchange": old.get("x-original-exchange") or message.exchange or "",
            "x-attempts": attempts,
        })
        # Who really sent it travels with the copy, for the check when it comes back and for
        # an operator's replay; a header the sender set itself is never kept.
        headers.pop(ORIGINAL_USER, None)
        if (sender := sender_of(message, rt.publisher.user_id)) is not None:
            headers[ORIGINAL_USER] = sender
        retrying = retry and attempts <= len(self.topology.retry_delays)
        exchange = self.topology.dead_letter_exchange(sub.queue)
        if retrying:
            target = self.topology.retry_queue(sub.queue, attempts)
        else:
            if retry:
                headers["x-error-reason"] = "retries_exhausted"
            target = self.topology.dlq(sub.queue)
        try:
            await rt.publisher.publish_raw(exchange, target, message.body, headers, message)
        except Exception:
            log.exception("could not park the failed delivery; returning it to its queue",
                          queue=sub.queue, target=target)
            await message.nack(requeue=True)
            return "requeued"
        await message.ack()
        if retrying:
            log.warning("delivery failed; will retry", queue=sub.queue, attempt=attempts,
                        retry_in=self.topology.retry_delays[attempts - 1], error=str(error)[:500])
        else:
            log.error("delivery dead-lettered", queue=sub.queue, dlq=target,
                      reason=headers["x-error-reason"], attempts=attempts,
                      error=str(error)[:500])
        if sub.receipts:
            # The delivery is settled by now: nothing here may send it round again.
            try:
                receipt = self._receipt(sub, event, "retried" if retrying else "dead_lettered",
                                        f"{type(error).__name__}: {error}"[:2000],
                                        received_at, started, message, attempt=attempts)
                await rt.execute(self._receipts_work(sub, [receipt]))
            except Exception:
                log.exception("could not record the receipt of a failed delivery")
        return "retried" if retrying else "dead_lettered"

    async def _announce_forever(self) -> None:
        consumes = {
            cls.model_fields["event_type"].default: self.topology.queue(self.spec.name, cls)
            for cls in self.spec.handlers
        }
        while True:
            announcement = SubscriberAnnounced(subscriber=self.spec.name,
                                               instance=self._instance, consumes=consumes,
                                               producer=self.spec.name)
            try:
                await self.runtime.execute(_constant(announcement))
            except Exception:
                log.exception("could not announce")
            await asyncio.sleep(self.settings.announce_interval)  # a heartbeat, not a wait

    async def stop(self) -> None:
        """Stop taking deliveries, let in-flight ones finish, flush the outbox, close.

        Handlers still running after the timeout are cancelled; their deliveries were never
        acked, so closing the channel returns them to the queue. Every broker step is bounded:
        a close that never answers (a connection half-way through a reconnect) must not keep
        the process from exiting.
        """
        rt = self.runtime
        for _channel, queue, tag in self._consumers.values():
            await _bounded(queue.cancel(tag), "cancel consumer")
        if self._in_flight:
            _, late = await asyncio.wait(set(self._in_flight), timeout=self.shutdown_timeout)
            if late:
                log.warning("handlers still running at shutdown; returning their deliveries",
                            count=len(late))
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=_STEP_TIMEOUT)
        for channel, _queue, _tag in self._consumers.values():
            await _bounded(channel.close(), "close channel")
        self._consumers.clear()
        if rt.relay is not None and rt.broker_ok():
            rt.relay.wake()
            await rt.relay.wait_idle(5)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_STEP_TIMEOUT)
        self._tasks.clear()
        if rt.connection is not None:
            await _bounded(rt.connection.close(), "close connection")
        await _bounded(rt.commits.finish(), "finish commits")
        await _bounded(rt.engine.dispose(), "close database")
        log.info("service stopped")


#: Loop turns without a new delivery after which a batch stops waiting to grow: a delivery
#: takes a few turns from the socket to the queue (frame, aiormq's task, aio-pika's task).
_BATCH_IDLE_YIELDS = 3

#: Seconds one shutdown step may take before we give up on it and go on.
_STEP_TIMEOUT = 5.0


async def _bounded(step: Awaitable[Any], what: str) -> None:
    try:
        await asyncio.wait_for(step, _STEP_TIMEOUT)
    except TimeoutError:
        log.warning("shutdown step timed out; going on", step=what, seconds=_STEP_TIMEOUT)
    except Exception as exc:  # a step failing (channel already closed) must not stop the rest
        log.debug("shutdown step failed; going on", step=what, error=str(exc))


#: Headers the broker sets on a delivery; a copy we publish starts without them.
_BROKER_HEADERS = frozenset({"x-death", "x-first-death-exchange", "x-first-death-queue",
                             "x-first-death-reason", "x-last-death-exchange",
                             "x-last-death-queue", "x-last-death-reason", "x-delivery-count"})


async def _ack_all(messages: Sequence[AbstractIncomingMessage]) -> None:
    """Ack deliveries with one `multiple` ack per channel they came on.

    Safe because a queue's deliveries are settled in order by one drainer: every earlier
    delivery on the channel is already acked or parked. A channel that closed since
    (reconnect) has returned its deliveries to the queue; they come again and are deduped.
    """
    last: dict[int, AbstractIncomingMessage] = {}
    for message in messages:
        # `channel` raises once the delivery's channel closed: nothing to ack on it then.
        with contextlib.suppress(Exception):
            last[id(message.channel)] = message
    for message in last.values():
        try:
            await message.ack(multiple=True)
        except Exception as exc:  # closed between the two steps: redelivered, deduped
            log.info("could not ack; the deliveries will come again", error=str(exc))


def _int(value: object) -> int:
    if isinstance(value, int | str | bytes):
        try:
            return int(value)
        except ValueError:
            return 0
    return 0


def _constant(event: Event) -> Work:
    """Work that changes nothing and publishes one event (a receipt, an announcement)."""

    async def work(_conn: AsyncConnection) -> Sequence[Event]:
        return [event]

    return work


async def run_service(spec: ServiceSpec[StoreT], settings: ServiceSettings,
                      extra: Callable[[Runtime[StoreT]], Coroutine[Any, Any, None]] | None = None
                      ) -> None:
    """Run a service until SIGINT or SIGTERM, then stop it cleanly."""
    return_freed_memory()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    configure_tracing(spec.name, settings.otel_traces_exporter)
    try:
        start_metrics_server(settings.metrics_host, settings.metrics_port, spec.name)
    except OSError as exc:  # a taken port must not stop the service from working
        log.warning("metrics not served", host=settings.metrics_host,
                    port=settings.metrics_port, error=str(exc))
    runner = ServiceRunner(spec, settings)
    start = asyncio.create_task(runner.__aenter__())
    stop_wait = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if start not in done:  # asked to stop while still waiting for the broker
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await start
        await runner.stop()
        return
    try:
        runtime = start.result()
    except TopologyError as exc:
        # Not a crash to retry: the operator must migrate the queue first.
        log.error("topology clash; not starting", error=str(exc))
        await runner.stop()
        raise SystemExit(f"{spec.name}: {exc}") from exc
    extra_task = asyncio.create_task(extra(runtime)) if extra is not None else None
    trimmer = asyncio.create_task(trim_forever(), name=f"{spec.name}-trim")
    waiters: set[asyncio.Task[Any]] = {stop_wait}
    if extra_task is not None:
        waiters.add(extra_task)
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping")
    trimmer.cancel()
    if extra_task is not None:
        extra_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await extra_task
    await runner.stop()
    if extra_task is not None and not extra_task.cancelled() and extra_task.exception():
        raise extra_task.exception()  # type: ignore[misc]

