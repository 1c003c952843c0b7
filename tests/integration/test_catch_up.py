"""Catch-up on a real broker: a subscriber added after orders were placed gets each of them
once, from the history the broker keeps, and nobody else sees a thing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import aio_pika
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from yarl import URL

from common.events import Event, OrderPlaced
from common.kit.outbox import outbox
from common.kit.runner import Runtime
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops import catchup
from common.ops.access import apply, declare_shared, grant_for, remove
from common.ops.observe import ManagementApi
from order_service.service import service as order
from order_service.store import OrderStore
from order_service.store.tables import deliveries
from tests.factories import make_order
from tests.integration.support import StartService, wait_for
from tests.integration.test_kit import PROBE, effect_count

pytestmark = pytest.mark.integration

#: The subscriber that comes later: one effect row per OrderPlaced it handles.
LATE = dataclasses.replace(PROBE, name="late", produces=())


async def place(order_rt: Runtime[OrderStore], count: int) -> list[OrderPlaced]:
    """`count` orders placed through the order service, once the broker confirmed each."""
    placed = [make_order(producer="order") for _ in range(count)]

    async def work(conn: AsyncConnection) -> Sequence[Event]:
        store = OrderStore(conn)
        for event in placed:
            await store.add_order(event)
        return placed

    await order_rt.execute(work)

    async def published() -> bool:
        async with order_rt.engine.connect() as conn:
            waiting = (await conn.execute(sa.select(sa.func.count()).select_from(outbox).where(
                outbox.c.event_id.in_([str(e.event_id) for e in placed]),
                outbox.c.sent_at.is_(None)))).scalar_one()
        return waiting == 0

    await wait_for(published, what=f"{count} orders confirmed by the broker")
    return placed


async def start_late(start_service: StartService, tmp_path: Path) -> Runtime[Any]:
    return await start_service(LATE, database_url=f"sqlite+aiosqlite:///{tmp_path / 'late.db'}")


async def receipts(order_rt: Runtime[OrderStore], outcome: str) -> int:
    """How many receipts with `outcome` the tracker keeps from the late subscriber."""
    async with order_rt.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(deliveries).where(
            deliveries.c.subscriber == "late", deliveries.c.outcome == outcome))).scalar_one())


async def each_once(late: Runtime[Any], orders: Sequence[OrderPlaced]) -> bool:
    counts = [await effect_count(late, order.order_id) for order in orders]
    assert all(n <= 1 for n in counts), counts
    return all(n == 1 for n in counts)


@pytest.fixture
def operator(amqp_url: str, management_url: str, name_prefix: str) -> ServiceSettings:
    """The settings `shop catch-up` runs with: the broker's administrator, the test's prefix."""
    return ServiceSettings(amqp_url=amqp_url, management_url=management_url,
                           name_prefix=name_prefix)


@pytest.fixture
async def order_rt(start_service: StartService) -> Runtime[OrderStore]:
    return await start_service(order)


async def bystander(amqp: aio_pika.abc.AbstractConnection, prefix: str
                    ) -> aio_pika.abc.AbstractQueue:
    """Another subscriber's queue on order.placed, never consumed: it keeps what it gets."""
    channel = await amqp.channel()
    queue = await channel.declare_queue(f"{prefix}bystander.order.placed", exclusive=True)
    await queue.bind(f"{prefix}order.placed")
    return queue


async def depth(amqp: aio_pika.abc.AbstractConnection, queue: str) -> int:
    channel = await amqp.channel()
    declared = await channel.declare_queue(queue, passive=True)
    await channel.close()
    return int(declared.declaration_result.message_count or 0)


async def shop_catch_up(operator: ServiceSettings, *args: str) -> dict[str, Any]:
    """`shop catch-up ... --json` as an operator runs it; its stdout parsed."""
    env = {**os.environ, "AMQP_URL": operator.amqp_url,
           "RABBITMQ_MANAGEMENT_URL": operator.management_url,
           "SHOP_NAME_PREFIX": operator.name_prefix}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "common.ops.cli", "catch-up", *args, "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_a_subscriber_added_later_gets_each_earlier_order_once_however_often_it_catches_up(
        start_service: StartService, order_rt: Runtime[OrderStore], operator: ServiceSettings,
        amqp: aio_pika.abc.AbstractConnection, tmp_path: Path, name_prefix: str) -> None:
    """Orders placed before the subscriber's queue existed: a catch-up from the start gives
    each exactly one effect, a second one (the command, this time) none more, and another
    subscriber's queue gets nothing but the originals."""
    other = await bystander(amqp, name_prefix)
    before = await place(order_rt, 5)
    late = await start_late(start_service, tmp_path)
    assert await effect_count(late) == 0

    first = await catchup.catch_up(operator, "late")
    assert [(e.event_type, e.replayed) for e in first.events] == [("OrderPlaced", 5)]
    await wait_for(lambda: each_once(late, before), what="one effect per earlier order")

    second = await shop_catch_up(operator, "late", "--from-start")
    assert second["replayed"] == 5
    assert second["events"][0]["queue"] == f"{name_prefix}late.order.placed"

    async def all_duplicates() -> bool:
        return await receipts(order_rt, "duplicate") == 5

    await wait_for(all_duplicates, what="the second catch-up's copies seen as duplicates")
    assert await each_once(late, before)
    assert await effect_count(late) == 5
    assert await depth(amqp, other.name) == 5


async def test_since_a_time_replays_only_the_events_that_occurred_from_then_on(
        start_service: StartService, order_rt: Runtime[OrderStore], operator: ServiceSettings,
        tmp_path: Path) -> None:
    """Orders placed before --since are read (the stream finds a time only to the chunk and
    the second) but not sent; those after are, once each."""
    earlier = await place(order_rt, 3)
    since = datetime.now(UTC)
    later = await place(order_rt, 4)
    late = await start_late(start_service, tmp_path)

    result = await catchup.catch_up(operator, "late", since=since)
    (report,) = result.events
    assert report.replayed == 4
    assert report.before_since == 3
    await wait_for(lambda: each_once(late, later), what="one effect per later order")
    assert [await effect_count(late, o.order_id) for o in earlier] == [0, 0, 0]


async def test_the_order_shows_the_receipts_of_a_subscriber_that_caught_up_and_is_never_late(
        start_service: StartService, order_rt: Runtime[OrderStore], operator: ServiceSettings,
        tmp_path: Path) -> None:
    """An order placed before the subscriber existed does not expect it, so it never turns
    late for it; once caught up, its status lists the subscriber as handled (joined later)."""
    (order,) = await place(order_rt, 1)
    await start_late(start_service, tmp_path)

    async def registered() -> bool:
        async with order_rt.engine.connect() as conn:
            return await OrderStore(conn).subscriber("late") is not None

    await wait_for(registered, what="the late subscriber's announcement")
    await catchup.catch_up(operator, "late", events=["OrderPlaced"])
    await wait_for(lambda: receipts(order_rt, "handled"), what="the late subscriber's receipt")

    much_later = datetime.now(UTC) + timedelta(hours=1)
    async with order_rt.engine.connect() as conn:
        store = OrderStore(conn)
        status = await store.status(order.order_id, now=much_later,
                                    late_after=timedelta(seconds=30))
        late_orders = await store.late_orders(much_later, timedelta(seconds=30))
    assert status is not None
    (subscriber,) = status.subscribers
    assert (subscriber.name, subscriber.status, subscriber.expected, subscriber.late) == (
        "late", "handled", False, False)
    assert status.complete
    assert late_orders == []


async def test_a_copy_is_the_message_its_producer_published(
        order_rt: Runtime[OrderStore], operator: ServiceSettings,
        amqp: aio_pika.abc.AbstractConnection, name_prefix: str) -> None:
    """Body, properties and headers as the producer sent them, persistent, with when it was
    caught up and without the stream's offset."""
    other = await bystander(amqp, name_prefix)
    await place(order_rt, 1)
    channel = await amqp.channel()
    topology = order_rt.topology
    idle = await topology.declare_subscriber_queue(
        channel, topology.queue("idle", OrderPlaced),
        await topology.declare_event_exchange(channel, OrderPlaced))

    await catchup.catch_up(operator, "idle")
    copy = await idle.get(no_ack=True)
    original = await other.get(no_ack=True)
    properties = ("body", "content_type", "message_id", "type", "correlation_id", "timestamp",
                  "app_id", "user_id", "delivery_mode")
    assert {p: getattr(copy, p) for p in properties} == {
        p: getattr(original, p) for p in properties}
    headers = dict(copy.headers or {})
    headers.pop("x-delivery-count")  # the quorum queue's, on each delivery
    assert original.timestamp is not None
    assert datetime.fromisoformat(str(headers.pop(catchup.CAUGHT_UP_AT))) >= original.timestamp
    assert headers == original.headers
    assert copy.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_a_catch_up_refuses_what_it_cannot_do_with_what_to_do(
        start_service: StartService, operator: ServiceSettings, tmp_path: Path) -> None:
    """A service without queues, an event the service does not consume, an unknown event
    type, a time to come: each is refused, saying why."""
    await start_late(start_service, tmp_path)
    with pytest.raises(catchup.CatchUpError, match="'nobody' has no queue on this broker"):
        await catchup.catch_up(operator, "nobody")
    with pytest.raises(catchup.CatchUpError, match=r"no queue for StockReserved.*consumes "
                                                   r"OrderPlaced"):
        await catchup.catch_up(operator, "late", events=["StockReserved"])
    with pytest.raises(catchup.CatchUpError, match="unknown event type OrderShipped"):
        await catchup.catch_up(operator, "late", events=["OrderShipped"])
    with pytest.raises(catchup.CatchUpError, match="in the future"):
        await catchup.catch_up(operator, "late", since=datetime.now(UTC) + timedelta(hours=1))


class LateSettings(ServiceSettings):
    service_name: ClassVar[str] = "late"


@pytest.fixture
async def users(operator: ServiceSettings, name_prefix: str
                ) -> AsyncIterator[tuple[dict[str, str], ServiceSettings]]:
    """Broker users for the order service and the late subscriber, as `shop broker setup`
    makes them, and an operator tagged impersonator as it tags the administrator; all under
    the test's prefix, deleted afterwards (the machine's administrator is left as it is).
    Ask for it before `start_service`, so the services stop before their users go."""
    topology = Topology(name_prefix)
    specs = (order.spec(order.settings()), LATE)
    passwords = {spec.name: secrets.token_urlsafe(16) for spec in specs}
    grants = [grant_for(spec, topology, observer=bool(spec.audit_handlers)) for spec in specs]
    await apply(operator, grants, passwords, operator_impersonates=False)
    await declare_shared(operator, topology)
    user, password = f"{name_prefix}operator", secrets.token_urlsafe(16)
    api = ManagementApi.of(operator)
    async with api.client() as client:
        for path, body in ((api.path("users", user),
                            {"password": password, "tags": "administrator,impersonator"}),
                           (api.path("permissions", api.vhost, user),
                            {"configure": ".*", "write": ".*", "read": ".*"})):
            (await client.put(path, json=body)).raise_for_status()
    impersonator = operator.model_copy(update={
        "amqp_url": str(URL(operator.amqp_url).with_user(user).with_password(password)),
        "management_url": str(URL(operator.management_url).with_user(user)
                              .with_password(password))})
    yield passwords, impersonator
    await remove(operator, [g.user for g in grants] + [user])


async def test_where_services_have_users_copies_keep_their_producer_only_for_an_impersonator(
        users: tuple[dict[str, str], ServiceSettings], start_service: StartService,
        operator: ServiceSettings, amqp: aio_pika.abc.AbstractConnection) -> None:
    """The subscriber believes the broker about who produced each event: an operator who may
    not speak for the order service is refused before anything is sent; one tagged
    impersonator sends each copy as the order service's user, and the subscriber handles
    them (none is parked as forged)."""
    passwords, impersonator = users
    order_rt = await start_service(order, broker_password=passwords["order"])
    before = await place(order_rt, 3)
    late = await start_service(LATE, LateSettings, broker_password=passwords["late"])

    with pytest.raises(catchup.CatchUpError, match="tagged impersonator"):
        await catchup.catch_up(operator, "late", events=["OrderPlaced"])
    result = await catchup.catch_up(impersonator, "late")
    assert result.replayed == 3
    await wait_for(lambda: each_once(late, before), what="one effect per earlier order")
    assert await depth(amqp, late.topology.dlq(late.topology.queue("late", OrderPlaced))) == 0
