"""Least privilege on the broker: a user per service, allowed only what the service does.

RabbitMQ grants a user three regular expressions per virtual host: what it may *configure*
(declare, delete), *write* (publish to an exchange, bind a queue) and *read* (consume from a
queue, bind from an exchange). A service here may:

- configure, write and read its own queues, their delay and dead-letter queues and their
  dead-letter exchange (`Topology.dead_letter_exchange`): nobody else can put a message into
  them but the exchanges they are bound to;
- configure the exchanges of the events it consumes and produces, and the audit exchange;
- write (publish to) the exchanges of the events it produces and the audit exchange;
- read (bind its queues to) the exchanges of the events it consumes;
- configure and bind the history stream of each event it produces to that event's exchange
  (`Topology.history_stream`: binding needs write on the stream and read on the exchange).
  Publishing into a queue goes through an exchange, so the stream only ever gets what the
  event's exchange routes; reading it is an operator's (`shop catch-up`).

With `user_id` validated by the broker on every publish, the producer of an event is then
established by the broker: the user is the service (`ServiceSettings.broker_user`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from common.events import SubscriberAnnounced
from common.kit.broker import connect
from common.kit.service import ServiceSpec
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops.observe import ManagementApi


@dataclass(frozen=True)
class Grant:
    """One service's broker user: its name, tags and permissions (anchored patterns)."""

    service: str
    user: str
    configure: str
    write: str
    read: str
    tags: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {"service": self.service, "user": self.user, "tags": list(self.tags),
                "configure": self.configure, "write": self.write, "read": self.read}


def _any_of(names: Iterable[str]) -> str:
    """A pattern matching exactly these names (a name never matches by accident: escaped)."""
    unique = sorted(set(names))
    return "^(" + "|".join(unique) + ")$" if unique else "^$"


def _exact(name: str) -> str:
    return re.escape(name)


def _own(queue: str, topology: Topology) -> list[str]:
    """Patterns of a queue and what belongs to it: dead-letter queue, delay queues (their
    delays are settings, hence the wildcard) and dead-letter exchange."""
    return [_exact(queue), _exact(topology.dlq(queue)), _exact(queue) + r"\.retry\..+",
            _exact(topology.dead_letter_exchange(queue))]


def grant_for(spec: ServiceSpec[Any], topology: Topology, *, observer: bool = False
              ) -> Grant:
    """What `spec`'s broker user may do under `topology`'s prefix.

    `observer`: the service reads the management API (the order service's `GET /system`),
    which needs the `monitoring` tag.
    """
    queues = [topology.queue(spec.name, cls) for cls in spec.handlers]
    if spec.audit_handlers:
        queues.append(topology.audit_queue)
    own = [pattern for queue in queues for pattern in _own(queue, topology)]
    # Consuming needs read on the queue; binding, read on the exchange bound from; declaring
    # a queue with a dead-letter exchange, read on the queue. Its own dead letters are an
    # operator's to read.
    consumable = [pattern for queue in queues
                  for pattern in (_exact(queue), _exact(queue) + r"\.retry\..+",
                                  _exact(topology.dead_letter_exchange(queue)))]
    audit = _exact(topology.audit_exchange)
    consumed = [_exact(topology.exchange(cls)) for cls in (*spec.handlers, *spec.audit_handlers)]
    produced = [_exact(topology.exchange(cls)) for cls in spec.produces]
    histories = [_exact(topology.history_stream(cls)) for cls in spec.produces]
    return Grant(
        service=spec.name,
        user=f"{topology.prefix}{spec.name}",
        configure=_any_of([*own, *consumed, *produced, *histories, audit]),
        write=_any_of([*own, *produced, *histories, audit]),
        read=_any_of([*consumable, *consumed, *produced]),
        tags=("monitoring",) if observer else (),
    )


class SetupError(RuntimeError):
    """The broker refused the set-up; the message says what to do."""


async def apply(settings: ServiceSettings, grants: Sequence[Grant],
                passwords: dict[str, str], *, operator_impersonates: bool = True
                ) -> list[str]:
    """Create or update each grant's user and permissions through the management API, with
    the credentials in `settings` (an administrator's); returns what was done, a line each.

    `operator_impersonates`: the administrator gets the `impersonator` tag too, so that
    `shop dlq replay` can send a dead letter back as its producer sent it.
    """
    api = ManagementApi.of(settings)
    done: list[str] = []
    async with api.client(timeout=10) as client:
        for grant in grants:
            password = passwords.get(grant.service)
            if not password:
                raise SetupError(f"no password for {grant.service}: set "
                                 f"{grant.service.upper()}_BROKER_PASSWORD")
            await _put(client, api.path("users", grant.user),
                       {"password": password, "tags": ",".join(grant.tags)})
            await _put(client, api.path("permissions", api.vhost, grant.user),
                       {"configure": grant.configure, "write": grant.write, "read": grant.read})
            done.append(f"user {grant.user}: permissions set in vhost {api.vhost}")
        if operator_impersonates:
            done.append(await _make_impersonator(client, api))
    return done


async def declare_shared(settings: ServiceSettings, topology: Topology) -> None:
    """The audit exchange and the tracker's queue, declared with the administrator's
    credentials: services with users of their own may not declare another's queue, and
    receipts must be kept even before the tracker first runs."""
    connection = await connect(settings.amqp_url, "shop-broker-setup", wait=30)
    try:
        channel = await connection.channel()
        exchange = await topology.declare_event_exchange(channel, SubscriberAnnounced)
        await topology.declare_subscriber_queue(channel, topology.audit_queue, exchange)
    finally:
        await connection.close()


async def remove(settings: ServiceSettings, users: Iterable[str]) -> None:
    """Delete broker users (tests; retiring a service). A missing user is not an error."""
    api = ManagementApi.of(settings)
    async with api.client(timeout=10) as client:
        for user in users:
            response = await client.delete(api.path("users", user))
            if response.status_code not in (204, 404):
                response.raise_for_status()


async def _put(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
    response = await client.put(url, json=body)
    if response.status_code in (401, 403):
        raise SetupError("the management API refused the set-up: RABBITMQ_MANAGEMENT_URL must "
                         "carry an administrator's credentials")
    response.raise_for_status()


async def _make_impersonator(client: httpx.AsyncClient, api: ManagementApi) -> str:
    user = api.auth[0]
    response = await client.get(api.path("users", user))
    response.raise_for_status()
    found = response.json()
    tags = found.get("tags") or []
    if isinstance(tags, str):  # 3.x answers a comma-separated string, 4.x a list
        tags = [t for t in tags.split(",") if t]
    if "impersonator" in tags:
        return f"operator {user}: already an impersonator"
    # The stored hash keeps the password as it is; only the tags change.
    await _put(client, api.path("users", user), {
        "password_hash": found["password_hash"],
        "hashing_algorithm": found["hashing_algorithm"],
        "tags": ",".join([*tags, "impersonator"]),
    })
    return f"operator {user}: tagged impersonator (replays keep each dead letter's producer)"

