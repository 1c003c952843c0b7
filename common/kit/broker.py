"""The robust connection and the publisher: persistent, confirmed, mandatory."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractMessage,
    AbstractRobustConnection,
    HeadersType,
)
from aio_pika.exceptions import AMQPConnectionError
from yarl import URL

from common.events import EVENT_TYPES, Event
from common.kit.logging import get_logger
from common.kit.telemetry import CONFIRM_SECONDS, PUBLISH_FAILURES, publish_span
from common.kit.topology import Topology

log = get_logger(__name__)

CONTENT_TYPE = "application/json"

#: Seconds between heartbeats: a stalled connection is noticed in about twice this.
DEFAULT_HEARTBEAT = 10


class UnroutableError(RuntimeError):
    """The broker returned a mandatory publish: no queue is bound to its exchange."""


def broker_url(url: str, connection_name: str) -> str:
    """The URL with a short heartbeat and a connection name, unless the URL sets them."""
    parsed = URL(url)
    query: dict[str, str] = dict(parsed.query)
    query.setdefault("heartbeat", str(DEFAULT_HEARTBEAT))
    query.setdefault("name", connection_name)
    return str(parsed.with_query(query))


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    parsed = URL(url)
    return str(parsed.with_password("***") if parsed.password else parsed).split("?")[0]


async def connect(url: str, connection_name: str, *, wait: float | None = None
                  ) -> AbstractRobustConnection:
    """A connection that reconnects by itself; waits for the broker with backoff first.

    `wait` bounds the wait in seconds (None: forever), so a service started before the
    broker comes up instead of crashing.
    """
    loop = asyncio.get_running_loop()
    deadline = None if wait is None else loop.time() + wait
    delay = 0.25
    attempt = 0
    while True:
        attempt += 1
        try:
            connection = await aio_pika.connect_robust(
                broker_url(url, connection_name),
                client_properties={"connection_name": connection_name},
                timeout=10,
            )
        except (TimeoutError, AMQPConnectionError, OSError, ConnectionError) as exc:
            if deadline is not None and loop.time() + delay > deadline:
                raise ConnectionError(
                    f"RabbitMQ at {safe_url(url)} did not answer within {wait:.0f} s ({exc}). "
                    "Start one (scripts/ensure-broker) or set AMQP_URL."
                ) from exc
            if attempt == 1 or attempt % 10 == 0:
                log.warning("waiting for the broker", url=safe_url(url), attempt=attempt,
                            error=str(exc) or type(exc).__name__, retry_in=round(delay, 2))
            await asyncio.sleep(delay)  # backoff between connection attempts, not a test wait
            delay = min(delay * 2, 5.0)
            continue
        _log_outages(connection, safe_url(url))
        return connection


def _log_outages(connection: AbstractRobustConnection, where: str) -> None:
    """One warning when the connection drops, one line when it is back: in place of the
    client's own reconnect logs (`common.kit.logging.ReconnectNoise`)."""
    lost_at: float | None = None

    def lost(_sender: Any, exc: BaseException | None = None) -> None:
        nonlocal lost_at
        # A close asked for is no outage. The callbacks cannot tell it by their argument (no
        # exception or a CancelledError, depending on which side finished the AMQP close
        # first) nor by is_closed (true only after they ran): close() sets close_called
        # before it touches the transport.
        if connection.close_called or lost_at is not None:
            return
        lost_at = time.monotonic()
        log.warning("broker connection lost; reconnecting", url=where,
                    reason=(str(exc) or type(exc).__name__) if exc is not None else None,
                    retry_every_s=getattr(connection, "reconnect_interval", None))

    def restored(_sender: Any) -> None:
        nonlocal lost_at
        down = None if lost_at is None else round(time.monotonic() - lost_at, 1)
        lost_at = None
        log.info("broker connection restored", url=where, down_s=down)

    connection.close_callbacks.add(lost)
    connection.reconnect_callbacks.add(restored)


def login_of(connection: AbstractConnection) -> str:
    """The broker user a connection logged in as (the AMQP client's default is guest)."""
    url = getattr(connection, "url", None)
    return (URL(url).user if url is not None else None) or "guest"


#: Where a copy the kit sends through a queue's dead-letter exchange keeps the broker user
#: that published the original: the copy itself is published by the queue's own service.
ORIGINAL_USER = "x-original-user-id"


def sender_of(message: AbstractMessage, own_user: str) -> str | None:
    """The broker user that published the event in `message`, as the broker validated it.

    A copy we made ourselves (a retry coming back, a replay of our dead letter) names its
    original sender in `ORIGINAL_USER`; only our own user can publish into our queues'
    dead-letter exchanges (`common.ops.access`), so only then is that header believed.
    """
    if message.user_id == own_user:
        original = (message.headers or {}).get(ORIGINAL_USER)
        if isinstance(original, bytes):
            original = original.decode(errors="replace")
        return original if isinstance(original, str) else own_user
    return message.user_id


def instance_name(service: str) -> str:
    """Who this running service is: host and pid, plus a token that keeps two runners in
    one process (tests) apart."""
    return f"{service}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Envelope(NamedTuple):
    """An event's envelope: what its AMQP properties repeat and its exchange is chosen by."""

    event_id: str
    event_type: str
    schema_version: int
    occurred_at: datetime
    correlation_id: str | None
    producer: str | None

    @classmethod
    def of(cls, event: Event) -> Envelope:
        return cls(str(event.event_id), event.event_type, event.schema_version,
                   event.occurred_at, event.correlation_id, event.producer)

    @classmethod
    def read(cls, body: str | bytes) -> Envelope:
        """The envelope of a stored event, without validating its payload again (it was
        validated when it was made)."""
        data = json.loads(body)
        return cls(data["event_id"], data["event_type"], int(data.get("schema_version", 1)),
                   datetime.fromisoformat(data["occurred_at"]), data.get("correlation_id"),
                   data.get("producer"))


def message_for(event: Event | Envelope, body: bytes | None = None,
                headers: Mapping[str, Any] | None = None, user_id: str | None = None
                ) -> aio_pika.Message:
    """The AMQP message for an event: the envelope repeated in the properties.

    `user_id` is the publishing connection's user: the broker refuses a message that claims
    another, so a consumer knows who really sent it (`common.ops.access`).
    """
    if body is None:
        if not isinstance(event, Event):
            raise ValueError("an envelope needs its body")
        body = event.model_dump_json().encode()
    envelope = event if isinstance(event, Envelope) else Envelope.of(event)
    return aio_pika.Message(
        body=body,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=envelope.event_id,
        type=envelope.event_type,
        correlation_id=envelope.correlation_id,
        timestamp=envelope.occurred_at,
        app_id=envelope.producer,
        user_id=user_id,
        headers=dict(headers or {"schema_version": envelope.schema_version}),
    )


class Publisher:
    """Publishes events to their fanout exchange with confirms; unroutable raises."""

    def __init__(self, connection: AbstractRobustConnection, topology: Topology,
                 service: str = "shop") -> None:
        self._connection = connection
        self._topology = topology
        self._service = service
        #: The broker user this publisher's messages name (`message_for`).
        self.user_id = login_of(connection)
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._lock = asyncio.Lock()

    async def _get_channel(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            # on_return_raises: a mandatory publish nobody can route is an error the caller
            # sees, not a silent drop.
            self._channel = await self._connection.channel(publisher_confirms=True,
                                                           on_return_raises=True)
            self._exchanges.clear()
        return self._channel

    async def exchange(self, name: str, kind: aio_pika.ExchangeType = aio_pika.ExchangeType.FANOUT
                       ) -> AbstractExchange:
        async with self._lock:
            channel = await self._get_channel()
            if name == "":
                return channel.default_exchange
            if name not in self._exchanges:
                self._exchanges[name] = await self._topology.declare_exchange(channel, name, kind)
            return self._exchanges[name]

    async def event_exchange(self, cls: type[Event]) -> AbstractExchange:
        """`cls`'s fanout exchange and, where the topology keeps history, its history stream
        bound to it: declared before this publisher's first publish of `cls` (the service
        declares those it produces at start), so no event it publishes misses the history."""
        name = self._topology.exchange(cls)
        async with self._lock:
            channel = await self._get_channel()
            if name not in self._exchanges:
                exchange = await self._topology.declare_event_exchange(channel, cls)
                if self._topology.keeps_history(cls):
                    await self._topology.declare_history(channel, exchange, cls)
                self._exchanges[name] = exchange
            return self._exchanges[name]

    async def publish(self, event: Event, *, body: bytes | None = None,
                      trace_parent: Mapping[str, Any] | None = None,
                      user_id: str | None = None) -> None:
        """Publish and wait for the broker's confirm.

        `trace_parent` is the trace context stored with the event when it was committed, so
        the publish span (and every consumer after it) joins the trace that produced it.
        `user_id`: as `publish_raw`'s.
        """
        await self._publish(type(event), Envelope.of(event),
                            body if body is not None else event.model_dump_json().encode(),
                            trace_parent, user_id)

    async def publish_stored(self, body: str, trace_parent: Mapping[str, Any] | None = None
                             ) -> None:
        """Publish an event as the outbox stored it (JSON), and wait for the confirm."""
        envelope = Envelope.read(body)
        await self._publish(EVENT_TYPES[envelope.event_type], envelope, body.encode(),
                            trace_parent)

    async def _publish(self, cls: type[Event], envelope: Envelope, body: bytes,
                       trace_parent: Mapping[str, Any] | None, user_id: str | None = None
                       ) -> None:
        exchange = await self.event_exchange(cls)
        with publish_span(exchange.name, envelope.event_id, envelope.event_type,
                          self._service, trace_parent) as trace_headers:
            headers: dict[str, Any] = {"schema_version": envelope.schema_version,
                                       **trace_headers}
            started = time.perf_counter()
            try:
                await self.publish_message(exchange, message_for(envelope, body, headers,
                                                                 user_id or self.user_id))
            except Exception:
                PUBLISH_FAILURES.labels(self._service, envelope.event_type).inc()
                raise
            CONFIRM_SECONDS.labels(self._service, envelope.event_type).observe(
                time.perf_counter() - started)

    async def publish_message(self, exchange: AbstractExchange, message: aio_pika.Message,
                              routing_key: str = "") -> None:
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=True, timeout=30)
        except aio_pika.exceptions.PublishError as exc:
            raise UnroutableError(
                f"no queue is bound to exchange {exchange.name!r}: "
                f"{message.type or 'message'} {message.message_id} was returned"
            ) from exc

    async def publish_raw(self, exchange_name: str, routing_key: str, body: bytes,
                          headers: HeadersType, template: aio_pika.abc.AbstractMessage | None,
                          kind: aio_pika.ExchangeType = aio_pika.ExchangeType.DIRECT,
                          user_id: str | None = None) -> None:
        """Publish bytes as they are (a dead letter keeps its body), with the original's
        properties where there is one, as this publisher's user unless `user_id` names
        another (which only a broker user tagged `impersonator` may do)."""
        exchange = await self.exchange(exchange_name, kind)
        message = aio_pika.Message(
            body=body,
            headers=headers,
            content_type=template.content_type if template else None,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=template.message_id if template else None,
            type=template.type if template else None,
            correlation_id=template.correlation_id if template else None,
            timestamp=template.timestamp if template else None,
            app_id=template.app_id if template else None,
            user_id=user_id or self.user_id,
        )
        await self.publish_message(exchange, message, routing_key)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
