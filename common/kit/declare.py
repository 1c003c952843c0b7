"""A service as its author writes it: a name, handlers registered where they are defined.

    service = Service("loyalty", store=PointsStore, tables=metadata)

    @service.handles(OrderPlaced)
    async def award_points(event: OrderPlaced, points: PointsStore) -> PointsAwarded:
        ...

The name is written once: the settings (variables `LOYALTY_*`), the queues
(`loyalty.order.placed`) and the broker user follow from it. A handler asks for what it
needs by type, as FastAPI's and FastStream's dependencies do: the service's store (on the
delivery's transaction), its settings, the connection, a `Clock`. What it returns (an event,
several, or None) is published with the delivery's commit; the kit fills in correlation,
causation and producer. What it may return is read from its return annotation, and is all
its broker user may publish.

A service with commands of its own names its Typer app as `module:attribute`
(`Service(..., cli="loyalty_service.cli:app")`): the `shop` command mounts it as
`shop loyalty ...`, importing it only then, so the commands may import the service and
running the service never loads them.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
import types
import typing
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.events import DeliveryReceipt, Event
from common.kit.service import ServiceSpec
from common.kit.settings import ServiceSettings, refusal

StoreT = TypeVar("StoreT")
SettingsT = TypeVar("SettingsT", bound=ServiceSettings)
HandlerT = TypeVar("HandlerT", bound=Callable[..., Awaitable[Any]])

#: What a service runs beside its consumers (the order service's HTTP API), given the
#: running service; it ends when the service stops.
Extra = Callable[[Any], Coroutine[Any, Any, None]]
#: Runs once after the tables exist, before consuming: `start(engine)`, or
#: `start(engine, settings)` when it takes two parameters (seed data a setting turns off).
OnStart = Callable[..., Awaitable[None]]


class Clock:
    """What time it is, for a handler that needs it (a test gives it a fixed one)."""

    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True)
class Delivery:
    """What the kit hands a handler's dependencies from: one delivery's transaction."""

    conn: AsyncConnection
    store: Any
    settings: ServiceSettings
    clock: Clock


class Service(Generic[StoreT]):
    """A service: its name, its store and tables, and the handlers it registers."""

    def __init__(self, name: str, *, store: Callable[[AsyncConnection], StoreT] | None = None,
                 tables: MetaData | None = None,
                 settings: type[ServiceSettings] = ServiceSettings,
                 on_start: OnStart | None = None, metrics_port: int = 0,
                 cli: str | None = None) -> None:
        if not name.isidentifier() or not name.islower():
            raise ValueError(f"a service's name is a lower-case Python identifier, not {name!r}")
        self.name = name
        self.store_class = store
        self.tables = tables if tables is not None else MetaData()
        self.on_start = on_start
        self.cli = cli
        self.settings_class = _settings_class(name, settings, metrics_port)
        self.clock = Clock()
        self._handlers: dict[type[Event], Callable[[Any, Delivery], Awaitable[list[Event]]]] = {}
        self._tracks: dict[type[Event], Callable[[Any, Delivery], Awaitable[list[Event]]]] = {}
        self._produces: dict[type[Event], None] = {}
        self._keep_receipts: Callable[[Any, Sequence[DeliveryReceipt]], Awaitable[None]] | None
        self._keep_receipts = None
        self.extras: list[Extra] = []

    # --- declaring ----------------------------------------------------------------------

    def handles(self, event: type[Event], *, produces: Iterable[type[Event]] | None = None
                ) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated function as this service's reaction to `event`: one queue,
        `<name>.<event's routing>`, bound to the event's exchange."""
        return self._register(self._handlers, event, produces)

    def tracks(self, event: type[Event]) -> Callable[[HandlerT], HandlerT]:
        """Register a handler on the audit queue (announcements, receipts): the tracker's."""
        return self._register(self._tracks, event, ())

    def produces(self, *events: type[Event]) -> None:
        """Events published other than by a handler's return (the order service's API)."""
        self._produces.update(dict.fromkeys(events))

    def keeps_receipts(self, keep: Callable[[StoreT, Sequence[DeliveryReceipt]], Awaitable[None]]
                       ) -> None:
        """Store the receipts of this service's own deliveries in its own tables (the
        tracker), rather than sending them to itself."""
        self._keep_receipts = keep

    def alongside(self, extra: Extra) -> Extra:
        """Run `extra(runtime)` beside the consumers while the service runs."""
        self.extras.append(extra)
        return extra

    def _register(self, table: dict[type[Event], Any], event: type[Event],
                  produces: Iterable[type[Event]] | None) -> Callable[[HandlerT], HandlerT]:
        def register(handler: HandlerT) -> HandlerT:
            if event in table:
                raise ValueError(f"{self.name} already handles {event.__name__}")
            provide, returns = self._inspect(handler, event, explicit=produces is not None)
            table[event] = _adapter(handler, provide)
            self._produces.update(dict.fromkeys(returns if produces is None else produces))
            return handler

        return register

    def _inspect(self, handler: Callable[..., Any], event: type[Event], *, explicit: bool
                 ) -> tuple[list[Callable[[Delivery], Any]], list[type[Event]]]:
        """How to provide each parameter after the event, and what it may return (unless
        the registration says so itself)."""
        hints = typing.get_type_hints(handler)
        params = list(inspect.signature(handler).parameters.values())
        if not params:
            raise TypeError(f"{handler.__qualname__} must take the {event.__name__} first")
        provide = [self._provider(handler, p.name, hints.get(p.name)) for p in params[1:]]
        return provide, [] if explicit else _events_in(hints.get("return"), handler)

    def _provider(self, handler: Callable[..., Any], name: str, wanted: Any
                  ) -> Callable[[Delivery], Any]:
        if isinstance(wanted, type):
            if self.store_class is not None and isinstance(self.store_class, type) \
                    and issubclass(self.store_class, wanted):
                return _store
            if issubclass(wanted, ServiceSettings):
                return _settings
            if issubclass(wanted, AsyncConnection):
                return _conn
            if issubclass(wanted, Clock):
                return _clock
        raise TypeError(
            f"{handler.__qualname__}: cannot provide parameter {name!r} ({wanted!r}); a "
            "handler may ask for the service's store, its settings, the AsyncConnection "
            "or a Clock, by type")

    # --- what the kit reads -------------------------------------------------------------

    @property
    def consumes(self) -> tuple[type[Event], ...]:
        return tuple(self._handlers)

    @property
    def tracked(self) -> tuple[type[Event], ...]:
        return tuple(self._tracks)

    @property
    def produced(self) -> tuple[type[Event], ...]:
        return tuple(self._produces)

    def settings(self, **values: Any) -> ServiceSettings:
        """Its settings, from the environment (and `values`, which win)."""
        return self.settings_class(**values)

    def commands(self) -> Any:
        """Its Typer app (`cli`, imported now), or None when it has no commands."""
        if self.cli is None:
            return None
        module, _, attribute = self.cli.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def spec(self, settings: ServiceSettings | None = None) -> ServiceSpec[Delivery]:
        """What the kit's runner runs."""
        settings = settings or self.settings()
        store = self.store_class
        clock = self.clock

        def delivery(conn: AsyncConnection) -> Delivery:
            return Delivery(conn, store(conn) if store is not None else None, settings, clock)

        keep = self._keep_receipts
        keep_receipts = None
        if keep is not None:
            async def keep_receipts(d: Delivery, receipts: Sequence[DeliveryReceipt]) -> None:
                await keep(d.store, receipts)

        return ServiceSpec(name=self.name, handlers=dict(self._handlers), store=delivery,
                           metadata=self.tables, produces=self.produced,
                           on_start=_started(self.on_start, settings),
                           audit_handlers=dict(self._tracks),
                           keep_receipts=keep_receipts)

    async def run(self, settings: ServiceSettings | None = None) -> None:
        """Run until SIGINT or SIGTERM, then stop cleanly."""
        from common.kit.runner import run_service  # the runner imports this module's types

        settings = settings or self.settings()
        extras = list(self.extras)

        async def beside(runtime: Any) -> None:
            await asyncio.gather(*(extra(runtime) for extra in extras))

        await run_service(self.spec(settings), settings, extra=beside if extras else None)

    def main(self) -> None:
        """`python -m <name>_service` and `shop run <name>`."""
        from common.kit.logging import configure_logging

        try:
            settings = self.settings()
        except ValidationError as exc:
            sys.exit(f"the {self.name} service refuses to start:\n"
                     f"{refusal(exc, self.settings_class)}")
        configure_logging(settings)
        asyncio.run(self.run(settings))


def _started(start: OnStart | None, settings: ServiceSettings
             ) -> Callable[[AsyncEngine], Awaitable[None]] | None:
    """`start` as the runner calls it: with the engine, and the settings if it takes them."""
    if start is None or len(inspect.signature(start).parameters) < 2:
        return start

    async def on_start(engine: AsyncEngine) -> None:
        await start(engine, settings)

    return on_start


def _store(d: Delivery) -> Any:
    return d.store


def _settings(d: Delivery) -> ServiceSettings:
    return d.settings


def _conn(d: Delivery) -> AsyncConnection:
    return d.conn


def _clock(d: Delivery) -> Clock:
    return d.clock


def _adapter(handler: Callable[..., Awaitable[Any]], provide: list[Callable[[Delivery], Any]]
             ) -> Callable[[Any, Delivery], Awaitable[list[Event]]]:
    """The handler as the runner calls it: (event, delivery) -> the events to publish."""

    async def handle(event: Any, delivery: Delivery) -> list[Event]:
        result = await handler(event, *(p(delivery) for p in provide))
        if result is None:
            return []
        if isinstance(result, Event):
            return [result]
        return list(result)

    handle.__qualname__ = handler.__qualname__
    handle.__doc__ = handler.__doc__
    return handle


def _events_in(annotation: Any, handler: Callable[..., Any]) -> list[type[Event]]:
    """The event classes a return annotation names: `A`, `A | B`, `list[A]`, `A | None`."""
    if annotation is None or annotation is type(None):
        return []
    if isinstance(annotation, type) and issubclass(annotation, Event):
        if annotation is Event:
            raise TypeError(f"{handler.__qualname__} returns any Event: name the events it "
                            "returns in its annotation, or pass produces=[...]")
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple, Sequence, Iterable):
        found: list[type[Event]] = []
        for arg in typing.get_args(annotation):
            if arg is not Ellipsis:
                found.extend(_events_in(arg, handler))
        return found
    raise TypeError(f"{handler.__qualname__}: cannot tell which events {annotation!r} holds; "
                    "annotate the return with the event classes, or pass produces=[...]")


def _settings_class(name: str, base: type[SettingsT], metrics_port: int) -> type[SettingsT]:
    """`base` for this service: its variables under `<NAME>_`, its name, its metrics port."""
    namespace: dict[str, Any] = {
        "model_config": SettingsConfigDict(env_prefix=f"{name.upper()}_", extra="ignore",
                                           populate_by_name=True),
        "service_name": name,
        "__module__": base.__module__,
        "__annotations__": {"service_name": ClassVar[str]},
    }
    if metrics_port:
        namespace["__annotations__"]["metrics_port"] = int
        namespace["metrics_port"] = _metrics_field(metrics_port)
    title = "".join(part.capitalize() for part in name.split("_"))
    return type(f"{title}Settings", (base,), namespace)


def _metrics_field(port: int) -> Any:
    from pydantic import Field

    return Field(port, ge=0, le=65535,
                 description="Port of the Prometheus /metrics endpoint; 0: off.")
