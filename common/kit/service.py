"""What a service declares about itself, and how the kit runs it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.events import DeliveryReceipt, Event

StoreT = TypeVar("StoreT")


class RejectedError(Exception):
    """An event that must not be handled, and that no retry can make acceptable.

    The kit dead-letters its delivery at once, with `reason` in `x-error-reason`, and goes
    on. It raises one itself for an unreadable body (poison) or a producer the broker does
    not vouch for; a handler raises one for an event its rules refuse (an outcome for an
    order that does not exist).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason

#: A handler: the business reaction to one event. It receives the event and the service's
#: store, bound to the transaction the kit opened for this delivery, and returns the events
#: it wants published. The kit commits the store's changes with those events (outbox) and
#: the delivery's dedupe record, then acks.
Handler = Callable[[Any, StoreT], Awaitable[Sequence[Event]]]


@dataclass(frozen=True)
class ServiceSpec(Generic[StoreT]):
    """A service as the kit sees it: a name, a handler table and a store."""

    name: str
    #: Which handler reacts to which event; one queue per event: `<service>.<routing>`.
    handlers: Mapping[type[Event], Handler[StoreT]]
    #: Builds the service's store on the delivery's transaction.
    store: Callable[[AsyncConnection], StoreT]
    #: The service's own tables, created at start-up.
    metadata: MetaData
    #: The events its handlers (and extras, such as an API) produce; receipts and
    #: announcements are the kit's. The kit refuses to store any other, and its broker user
    #: may publish these and no more (`common.ops.access`).
    produces: tuple[type[Event], ...] = ()
    #: Runs once after the tables exist (seed data, for example).
    on_start: Callable[[AsyncEngine], Awaitable[None]] | None = None
    #: Extra handlers on the audit queue (receipts, announcements); only the tracker has them.
    audit_handlers: Mapping[type[Event], Handler[StoreT]] = field(default_factory=dict)
    #: Stores receipts in the service's own tables. The tracker sets it: the receipts of
    #: its own deliveries are then kept in the delivery's transaction, not sent to itself.
    keep_receipts: Callable[[StoreT, Sequence[DeliveryReceipt]], Awaitable[None]] | None = None
