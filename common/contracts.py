"""The event contracts as a reader needs them: each event's exchange, schema version,
producers and subscribers, and the AsyncAPI 3.0 document of the whole, built from the code.

Everything here is read from the models in `common.events`, the names in
`common.kit.topology` and the services' declarations (`Service.consumes`, `.tracked`,
`.produced`), so the document cannot drift from what runs. AsyncAPI 3.0.0 rather than 2.6:
3.0 separates channels (an exchange, a queue) from operations (who sends, who receives), which
is choreography's shape exactly, and it is the version the AsyncAPI tools and FastStream
generate; 3.1 adds nothing this document uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic.json_schema import models_json_schema
from yarl import URL

from common.events import (
    EVENT_TYPES,
    KIT_EVENTS,
    DeliveryReceipt,
    DeliveryReceipts,
    Event,
    SubscriberAnnounced,
)
from common.kit.declare import Service
from common.kit.topology import Topology

ASYNCAPI = "3.0.0"
#: The AMQP bindings' version that AsyncAPI 3.0.0 defines.
AMQP_BINDINGS = "0.3.0"
CONTENT_TYPE = "application/json"
#: Who sends the receipt of a dead letter replayed by an operator: a tool, not a service.
REPLAY_TOOL = "shop dlq replay"

#: The AMQP properties the kit sets on every message (`common.kit.broker.message_for`), and
#: what each carries: the envelope, readable by a broker tool without parsing the body.
AMQP_PROPERTIES: dict[str, str] = {
    "message_id": "event_id: consumers dedupe on it",
    "type": "event_type",
    "content_type": CONTENT_TYPE,
    "correlation_id": "correlation_id: the flow (the order id)",
    "timestamp": "occurred_at, to the second",
    "app_id": "producer",
    "user_id": "the publishing connection's broker user, which RabbitMQ validates: the "
               "producer a consumer believes",
    "delivery_mode": "2: persistent",
}


@dataclass(frozen=True)
class Subscriber:
    """A service consuming an event, and the queue it consumes it from."""

    service: str
    queue: str


@dataclass(frozen=True)
class EventContract:
    """One event type as the system carries it."""

    event: type[Event]
    exchange: str
    producers: tuple[str, ...]
    subscribers: tuple[Subscriber, ...]

    @property
    def name(self) -> str:
        return event_name(self.event)

    @property
    def schema_version(self) -> int:
        return schema_version(self.event)

    @property
    def kit(self) -> bool:
        """Sent by the kit on the services' behalf (announcements, receipts)."""
        return self.event in KIT_EVENTS

    def summary(self) -> dict[str, Any]:
        return {"event": self.name, "exchange": self.exchange,
                "schema_version": self.schema_version, "kit": self.kit,
                "producers": list(self.producers),
                "subscribers": [{"service": s.service, "queue": s.queue}
                                for s in self.subscribers]}


def event_name(event: type[Event]) -> str:
    return str(event.model_fields["event_type"].default)


def schema_version(event: type[Event]) -> int:
    return int(event.model_fields["schema_version"].default)


def all_events(services: Iterable[Service[Any]]) -> list[type[Event]]:
    """The events of `common.events`, then any other a service declares (a service may
    define its own, in its own package)."""
    found = dict.fromkeys(EVENT_TYPES.values())
    for s in services:
        found.update(dict.fromkeys((*s.consumes, *s.tracked, *s.produced)))
    return list(found)


def catalog(services: Iterable[Service[Any]], topology: Topology) -> list[EventContract]:
    """Every event, with who produces it and who consumes it from which queue."""
    services = list(services)
    found = []
    for event in all_events(services):
        subscribers = [Subscriber(s.name, topology.queue(s.name, event))
                       for s in services if event in s.consumes]
        subscribers += [Subscriber(s.name, topology.audit_queue)
                        for s in services if event in s.tracked]
        found.append(EventContract(event, topology.exchange(event),
                                   tuple(_producers(event, services)), tuple(subscribers)))
    return found


def _producers(event: type[Event], services: list[Service[Any]]) -> list[str]:
    if event not in KIT_EVENTS:
        return [s.name for s in services if event in s.produced]
    # The kit's own events, as the runner sends them: every consumer announces itself, and
    # sends the receipts of its deliveries unless it keeps them itself (the tracker).
    if event is SubscriberAnnounced:
        return [s.name for s in services if s.consumes]
    if event is DeliveryReceipts:
        return [s.name for s in services if s.consumes and not _keeps_receipts(s)]
    if event is DeliveryReceipt:
        return [REPLAY_TOOL]
    raise ValueError(f"no rule says who sends the kit's {event.__name__}")


def _keeps_receipts(service: Service[Any]) -> bool:
    # The spec is what the runner reads; built on unread settings, it costs no environment.
    return service.spec(service.settings_class.model_construct()).keep_receipts is not None


# --- the AsyncAPI document ----------------------------------------------------------------

def asyncapi(services: Iterable[Service[Any]], topology: Topology, *,
             broker_url: str | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of the system: a channel per exchange and per subscriber
    queue, an operation per producer and per consumer, a message and its JSON Schema per
    event. `broker_url` adds the broker as its server (host, port and virtual host only)."""
    services = list(services)
    contracts = catalog(services, topology)
    vhost = _vhost(broker_url)
    channels: dict[str, dict[str, Any]] = {}
    operations: dict[str, dict[str, Any]] = {}
    users = {s.name: f"{topology.prefix}{s.name}" for s in services}
    payloads, schemas = _schemas(c.event for c in contracts)
    for c in contracts:
        exchange = _channel(channels, c.exchange, _exchange_channel(c, vhost))
        exchange["messages"][c.name] = _ref("components", "messages", c.name)
        for producer in c.producers:
            _operation(operations, f"send.{_slug(producer)}.{c.exchange}", c.exchange, c.name,
                       _send(producer, c.exchange, users.get(producer)))
        for sub in c.subscribers:
            queue = _channel(channels, sub.queue, _queue_channel(sub, topology, vhost))
            queue["messages"][c.name] = _ref("components", "messages", c.name)
            queue["x-bound-to"] = sorted({*queue["x-bound-to"], c.exchange})
            _operation(operations, f"receive.{sub.queue}", sub.queue, c.name,
                       _receive(sub))
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI,
        "info": _info(topology),
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas,
                       "messages": {c.name: _message(c, payloads[c.event]) for c in contracts}},
    }
    if broker_url is not None:
        document["servers"] = {"rabbitmq": _server(broker_url)}
    return document


def _info(topology: Topology) -> dict[str, Any]:
    try:
        release = version("shop-choreography")
    except PackageNotFoundError:  # run from a source tree that was never installed
        release = "0.0.0"
    prefix = f" Every name carries the prefix {topology.prefix!r}." if topology.prefix else ""
    return {
        "title": "Shop events",
        "version": release,
        "description": (
            "The events of the choreographed order platform: one durable fanout exchange "
            "per event type, one durable queue per subscriber and event, each subscriber's "
            "delay and dead-letter queues beside it. Delivery is at least once; consumers "
            "dedupe on event_id. Readers are tolerant (unknown fields are ignored), so a "
            "producer may add an optional field; any other change to a payload is a new "
            "schema_version, whose wire schema is kept in docs/events/." + prefix),
    }


def _channel(channels: dict[str, dict[str, Any]], name: str, fresh: dict[str, Any]
             ) -> dict[str, Any]:
    channel = channels.setdefault(name, fresh)
    if channel["bindings"]["amqp"]["is"] != fresh["bindings"]["amqp"]["is"]:
        raise ValueError(f"{name!r} names both an exchange and a queue")
    return channel


def _exchange_channel(c: EventContract, vhost: str) -> dict[str, Any]:
    return {
        "address": c.exchange,
        "title": f"exchange {c.exchange}",
        "description": ("The audit exchange: announcements and receipts, for the tracker."
                        if c.kit else
                        f"The fanout exchange of {c.name}: each subscriber's queue is bound "
                        "to it and gets its own copy."),
        "messages": {},
        "bindings": {"amqp": {
            "is": "routingKey",
            "exchange": {"name": c.exchange, "type": "fanout", "durable": True,
                         "autoDelete": False, "vhost": vhost},
            "bindingVersion": AMQP_BINDINGS,
        }},
    }


def _queue_channel(sub: Subscriber, topology: Topology, vhost: str) -> dict[str, Any]:
    retries = [topology.retry_queue(sub.queue, n)
               for n in range(1, len(topology.retry_delays) + 1)]
    return {
        "address": sub.queue,
        "title": f"queue {sub.queue}",
        "description": (f"{sub.service}'s queue: a quorum queue with a delivery limit. A "
                        f"failing delivery waits in its delay queues ({', '.join(retries)}) "
                        f"and is then parked in {topology.dlq(sub.queue)}."),
        "messages": {},
        "bindings": {"amqp": {
            "is": "queue",
            "queue": {"name": sub.queue, "durable": True, "exclusive": False,
                      "autoDelete": False, "vhost": vhost},
            "bindingVersion": AMQP_BINDINGS,
        }},
        "x-bound-to": [],
        "x-queue-type": "quorum",
        "x-dead-letter-queue": topology.dlq(sub.queue),
        "x-retry-queues": retries,
    }


def _operation(operations: dict[str, dict[str, Any]], key: str, channel: str, message: str,
               fresh: dict[str, Any]) -> None:
    operation = operations.setdefault(key, {**fresh, "channel": _ref("channels", channel),
                                            "messages": []})
    operation["messages"].append(_ref("channels", channel, "messages", message))


def _send(producer: str, exchange: str, user: str | None) -> dict[str, Any]:
    binding: dict[str, Any] = {"deliveryMode": 2, "mandatory": True, "timestamp": True}
    if user is not None:
        binding["userId"] = user
    return {"action": "send", "title": f"{producer} publishes to {exchange}",
            "description": "Persistent and mandatory, with publisher confirms; a service's "
                           "events leave from its transactional outbox, as its own broker "
                           "user (userId) when it has one.",
            "bindings": {"amqp": {**binding, "bindingVersion": AMQP_BINDINGS}},
            "x-producer": producer}


def _receive(sub: Subscriber) -> dict[str, Any]:
    return {"action": "receive", "title": f"{sub.service} consumes {sub.queue}",
            "description": "Acked once the effect, the dedupe record and the events it "
                           "produces are committed together.",
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDINGS}},
            "x-consumer": sub.service}


def _message(c: EventContract, payload: dict[str, Any]) -> dict[str, Any]:
    doc = (c.event.__doc__ or "").strip()
    return {
        "name": c.name,
        "title": c.name,
        "summary": doc.splitlines()[0] if doc else c.name,
        "contentType": CONTENT_TYPE,
        "payload": payload,
        "headers": {"type": "object", "required": ["schema_version"], "properties": {
            "schema_version": {"type": "integer", "const": c.schema_version,
                               "description": "The payload's schema_version, repeated."},
            "traceparent": {"type": "string", "description": "W3C trace context."},
            "tracestate": {"type": "string", "description": "W3C trace context."},
        }},
        "correlationId": {"location": "$message.payload#/correlation_id",
                          "description": "The flow: the order id for the order flow."},
        "bindings": {"amqp": {"messageType": c.name, "bindingVersion": AMQP_BINDINGS,
                              "x-properties": AMQP_PROPERTIES}},
        "x-schema-version": c.schema_version,
        "x-producers": list(c.producers),
        "x-subscribers": [s.service for s in c.subscribers],
    }


def _schemas(events: Iterable[type[Event]]
             ) -> tuple[dict[type[Event], dict[str, Any]], dict[str, Any]]:
    """Each event's reference to its JSON Schema (as consumers validate it), and every
    schema: the events' and the models they use, each once, referring to one another within
    the document (pydantic names two models of one name apart by their modules)."""
    events = list(events)
    refs, top = models_json_schema([(event, "validation") for event in events],
                                   ref_template="#/components/schemas/{model}")
    return {event: dict(refs[event, "validation"]) for event in events}, top.get("$defs", {})


def _server(broker_url: str) -> dict[str, Any]:
    url = URL(broker_url)
    host = url.host or "localhost"
    return {"host": f"{host}:{url.port}" if url.port else host,
            "pathname": url.raw_path or "/",
            "protocol": url.scheme or "amqp", "protocolVersion": "0-9-1",
            "description": "RabbitMQ: the virtual host is the path."}


def _vhost(broker_url: str | None) -> str:
    """The virtual host an AMQP URL names: its path without the slash, `/` when empty."""
    if broker_url is None:
        return "/"
    return URL(broker_url).path[1:] or "/"


def _ref(*path: str) -> dict[str, str]:
    """A reference within the document (RFC 6901: `~` and `/` in a name escaped)."""
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)}


def _slug(name: str) -> str:
    return "-".join(name.split())
