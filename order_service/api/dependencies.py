"""What the API's routes are given: the running service and its settings (`app.state`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Annotated, Protocol

from fastapi import Depends, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.events import Event
from common.kit.settings import ServiceSettings
from order_service.settings import OrderSettings
from order_service.tracker import Transactions

#: A unit of work: changes on the transaction's connection, and the events they produce.
Work = Callable[[AsyncConnection], Awaitable[Sequence[Event]]]


class OrderRuntime(Protocol):
    """What the API needs from the running service (`common.kit.runner.Runtime` has it).

    A protocol rather than the concrete class keeps the API testable without a broker.
    """

    @property
    def settings(self) -> ServiceSettings: ...

    @property
    def engine(self) -> AsyncEngine: ...

    @property
    def commits(self) -> Transactions:
        """Transactions whose work returns what it computed (and publishes nothing)."""
        ...

    async def execute(self, work: Work) -> list[Event]:
        """One transaction: run `work`, put the events it returns in the outbox, commit."""
        ...

    def broker_ok(self) -> bool: ...

    async def db_ok(self) -> bool: ...


def runtime_or_none(request: Request) -> OrderRuntime | None:
    """The running service; None when the API was made without one (its docs only)."""
    runtime: OrderRuntime | None = request.app.state.runtime
    return runtime


def running(request: Request) -> OrderRuntime:
    """The running service, or 503."""
    runtime = runtime_or_none(request)
    if runtime is None:
        raise HTTPException(503, "the order service is not running")
    return runtime


def order_settings(request: Request) -> OrderSettings:
    settings: OrderSettings = request.app.state.settings
    return settings


def late_after(request: Request) -> timedelta:
    """How long an expected subscriber has to answer an order (ORDER_LATE_AFTER)."""
    return timedelta(seconds=order_settings(request).late_after)


Running = Annotated[OrderRuntime, Depends(running)]
MaybeRunning = Annotated[OrderRuntime | None, Depends(runtime_or_none)]
Settings = Annotated[OrderSettings, Depends(order_settings)]
LateAfter = Annotated[timedelta, Depends(late_after)]
