"""Declaring a service: its name once, handlers by decorator, dependencies by type."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import (
    Event,
    OrderPlaced,
    ReservedLine,
    StockReservationFailed,
    StockReserved,
)
from common.kit.declare import Clock, Delivery, Service
from common.kit.settings import ServiceSettings
from tests.factories import make_order

pytestmark = pytest.mark.unit


class Points:
    """A store of the test's own."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn


def test_the_name_gives_the_settings_variables_and_the_broker_user(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`Service("loyalty")`: settings read from LOYALTY_*, named loyalty, with the metrics
    port given."""
    monkeypatch.setenv("LOYALTY_PREFETCH", "7")
    service: Service[None] = Service("loyalty", metrics_port=9104)
    settings = service.settings()
    assert settings.service_name == "loyalty"
    assert settings.prefetch == 7
    assert settings.metrics_port == 9104
    assert settings.broker_user == "loyalty"


@pytest.mark.parametrize("name", ["Loyalty", "loyalty-points", "1st", ""])
def test_a_name_that_is_no_lower_case_identifier_is_refused(name: str) -> None:
    """Queue, variable and package names follow from the name: it must fit all three."""
    with pytest.raises(ValueError, match="identifier"):
        Service(name)


async def test_a_handler_gets_what_it_asks_for_by_type_and_returns_plain_events() -> None:
    """Store, settings, connection and clock by annotation; an event, None or several
    returned become the list the kit publishes; what it returns is what it produces."""
    service = Service("loyalty", store=Points)
    seen: dict[str, Any] = {}

    @service.handles(OrderPlaced)
    async def one(event: OrderPlaced, points: Points, settings: ServiceSettings,
                  conn: AsyncConnection, clock: Clock) -> StockReserved | StockReservationFailed:
        seen.update(points=points, settings=settings, conn=conn, clock=clock)
        return StockReserved(order_id=event.order_id, lines=(ReservedLine(sku="A", quantity=1),))

    spec = service.spec(service.settings())
    delivery = spec.store("the connection")  # type: ignore[arg-type]
    assert isinstance(delivery, Delivery)
    [published] = await spec.handlers[OrderPlaced](make_order(), delivery)
    assert isinstance(published, StockReserved)
    assert isinstance(seen["points"], Points)
    assert seen["points"].conn == "the connection"
    assert seen["settings"].service_name == "loyalty"
    assert seen["conn"] == "the connection"
    assert isinstance(seen["clock"], Clock)
    assert set(spec.produces) == {StockReserved, StockReservationFailed}
    assert service.consumes == (OrderPlaced,)


async def test_none_and_lists_are_normalised() -> None:
    """None publishes nothing; a list publishes each."""
    service: Service[None] = Service("quiet")

    @service.handles(OrderPlaced)
    async def nothing(event: OrderPlaced) -> None:
        return None

    @service.handles(StockReserved)
    async def two(event: StockReserved) -> list[StockReserved]:
        return [event, event]

    spec = service.spec(service.settings())
    delivery = spec.store("c")  # type: ignore[arg-type]
    assert await spec.handlers[OrderPlaced](make_order(), delivery) == []
    reserved = StockReserved(order_id=make_order().order_id,
                             lines=(ReservedLine(sku="A", quantity=1),))
    assert len(await spec.handlers[StockReserved](reserved, delivery)) == 2
    assert spec.produces == (StockReserved,)


def test_what_the_kit_cannot_provide_or_know_is_refused_when_declared() -> None:
    """A parameter of a type the kit does not provide, a return of any Event, or a second
    handler for one event fail at registration, with the reason."""
    service: Service[None] = Service("strict")
    with pytest.raises(TypeError, match="cannot provide parameter 'limit'"):
        @service.handles(OrderPlaced)
        async def wants_an_int(event: OrderPlaced, limit: int) -> None:
            return None

    with pytest.raises(TypeError, match="returns any Event"):
        @service.handles(OrderPlaced)
        async def vague(event: OrderPlaced) -> list[Event]:
            return []

    @service.handles(OrderPlaced, produces=[StockReserved])
    async def explicit(event: OrderPlaced) -> list[Event]:
        return []

    assert service.produced == (StockReserved,)
    with pytest.raises(ValueError, match="already handles OrderPlaced"):
        service.handles(OrderPlaced)(explicit)


class Seeded(ServiceSettings):
    """Settings of a service's own, as a service declares them."""

    seed: bool = True


async def test_on_start_gets_the_settings_when_it_asks_for_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`on_start(engine, settings)` is given the service's settings (read from its own
    variables); `on_start(engine)` only the engine."""
    seen: list[object] = []

    async def seed(engine: object, settings: Seeded) -> None:
        seen.append((engine, settings.seed))

    async def plain(engine: object) -> None:
        seen.append(engine)

    monkeypatch.setenv("LOYALTY_SEED", "false")
    with_settings: Service[None] = Service("loyalty", settings=Seeded, on_start=seed)
    on_start = with_settings.spec(with_settings.settings()).on_start
    assert on_start is not None
    await on_start("the engine")  # type: ignore[arg-type]
    without = Service("loyalty", on_start=plain).spec().on_start
    assert without is not None
    await without("the engine")  # type: ignore[arg-type]
    assert seen == [("the engine", False), "the engine"]


def test_a_refused_setting_stops_main_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`service.main()` with a setting its class refuses exits before running, naming the
    variable (under the service's prefix) and why, not the value."""
    service: Service[None] = Service("loyalty", settings=Seeded)
    monkeypatch.setenv("LOYALTY_SEED", "perhaps-not")
    monkeypatch.setenv("LOYALTY_PREFETCH", "0")

    def started(*_args: object) -> None:
        raise AssertionError("the service went on to start")

    monkeypatch.setattr(service, "run", started)
    with pytest.raises(SystemExit) as exited:
        service.main()
    message = str(exited.value.code)
    assert message.startswith("the loyalty service refuses to start:")
    assert "LOYALTY_SEED: Input should be a valid boolean" in message
    assert "LOYALTY_PREFETCH: Input should be greater than or equal to 1" in message
    assert "perhaps-not" not in message


def test_the_commands_are_found_by_their_import_path() -> None:
    """`cli="module:attribute"` names the service's Typer app, which `commands()` (the
    `shop` command) loads; a service without commands has None."""
    service: Service[None] = Service("loyalty", cli="tests.unit.test_declare:COMMANDS")
    assert service.commands() is COMMANDS
    assert Service("quiet").commands() is None


#: What `test_the_commands_are_found_by_their_import_path` names as a service's commands.
COMMANDS = object()
