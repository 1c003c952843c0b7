"""Services with broker users of their own: they work, and may do nothing else."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncConnection
from yarl import URL

from common.events import (
    DeliveryReceipt,
    Event,
    OrderPlaced,
    ReservedLine,
    StockReserved,
    SubscriberAnnounced,
)
from common.kit.broker import ORIGINAL_USER, Publisher, message_for
from common.kit.runner import Runtime
from common.kit.service import ServiceSpec
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops.access import apply, declare_shared, grant_for, remove
from inventory_service.service import service as inventory
from logistics_service.service import service as logistics
from order_service.service import service as order
from order_service.store import OrderStore
from seller_service.service import service as seller
from tests.factories import make_line, make_order
from tests.integration.support import StartService, wait_for

pytestmark = pytest.mark.integration

#: What each service declares, as `shop broker setup` reads it for the grants.
ORDER, INVENTORY, LOGISTICS, SELLER = (s.spec() for s in (order, inventory, logistics, seller))

Provision = Callable[[Sequence[ServiceSpec[Any]]], Awaitable[dict[str, str]]]


@pytest.fixture
async def users(amqp_url: str, management_url: str, name_prefix: str
                ) -> AsyncIterator[Provision]:
    """Broker users for specs under the test's prefix, as `shop broker setup` makes them
    (run as the test broker's administrator); deleted afterwards. Ask for it before
    `start_service`, so the services stop before their users go."""
    admin = ServiceSettings(amqp_url=amqp_url, management_url=management_url,
                            name_prefix=name_prefix)
    topology = Topology(name_prefix)
    made: list[str] = []

    async def provision(specs: Sequence[ServiceSpec[Any]]) -> dict[str, str]:
        passwords = {spec.name: secrets.token_urlsafe(16) for spec in specs}
        grants = [grant_for(spec, topology, observer=bool(spec.audit_handlers))
                  for spec in specs]
        made.extend(g.user for g in grants)
        # The machine's broker is shared: its administrator is left as it is.
        await apply(admin, grants, passwords, operator_impersonates=False)
        await declare_shared(admin, topology)
        return passwords

    yield provision
    await remove(admin, made)


async def ignore(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
    return None


def login(amqp_url: str, user: str, password: str) -> str:
    return str(URL(amqp_url).with_user(user).with_password(password))


async def test_services_with_users_of_their_own_take_an_order_through(
        users: Provision, start_service: StartService, name_prefix: str) -> None:
    """Every service connects as its own user with only its grant: the order is placed,
    reserved, shipped and notified, and every subscriber's receipt reaches the tracker."""
    passwords = await users([ORDER, INVENTORY, LOGISTICS, SELLER])
    runtimes: dict[str, Runtime[Any]] = {}
    for service in (inventory, logistics, seller, order):
        runtimes[service.name] = await start_service(service,
                                                     broker_password=passwords[service.name])
    order_rt = runtimes["order"]
    assert order_rt.publisher is not None
    assert order_rt.publisher.user_id == f"{name_prefix}order"

    async def known() -> bool:
        async with order_rt.engine.connect() as conn:
            names = {s.name for s in await OrderStore(conn).list_subscribers()}
        return {"inventory", "logistics", "seller"} <= names

    await wait_for(known, what="three announcements")
    event = make_order(make_line("SKU-BOOK-1", 1, price="12.50", seller="seller-books"),
                       producer="order")

    async def work(conn: AsyncConnection) -> Sequence[Event]:
        await OrderStore(conn).add_order(event)
        return [event]

    await order_rt.execute(work)

    async def done() -> Any:
        async with order_rt.engine.connect() as conn:
            found = await OrderStore(conn).status(event.order_id)
        return found if found is not None and found.complete and found.state == "confirmed" \
            else None

    status = await wait_for(done, timeout=20, what="the order handled by all three")
    assert {s.name: s.status for s in status.subscribers} == {
        "inventory": "handled", "logistics": "handled", "seller": "handled"}


class ProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "accessprobe"


async def always_fails(event: OrderPlaced, store: AsyncConnection) -> Sequence[Event]:
    raise RuntimeError("the downstream is broken")


PROBE = ServiceSpec(name="accessprobe", handlers={OrderPlaced: always_fails},
                    store=lambda conn: conn, metadata=MetaData())


async def test_retries_and_dead_letters_go_through_the_queues_own_exchange(
        users: Provision, start_service: StartService, amqp: aio_pika.abc.AbstractConnection,
        amqp_url: str, name_prefix: str) -> None:
    """Under its own user a service can retry and park a failing delivery (it has no right to
    the default exchange); the dead letter names the broker user that sent the original."""
    passwords = await users([PROBE, ORDER])
    runtime = await start_service(PROBE, ProbeSettings, broker_password=passwords["accessprobe"],
                                  retry_delays=(0.05,))
    queue = runtime.topology.queue("accessprobe", OrderPlaced)
    sender = await aio_pika.connect(login(amqp_url, f"{name_prefix}order", passwords["order"]))
    try:
        channel = await sender.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(runtime.topology.exchange(OrderPlaced),
                                              ensure=False)
        order = make_order(producer="order")
        await exchange.publish(message_for(order, user_id=f"{name_prefix}order"),
                               routing_key="")
    finally:
        await sender.close()
    inspect = await amqp.channel()

    async def parked() -> aio_pika.abc.AbstractIncomingMessage | None:
        dlq = await inspect.declare_queue(runtime.topology.dlq(queue), passive=True)
        return await dlq.get(fail=False, no_ack=True)

    letter = await wait_for(parked, timeout=15, what="the delivery in its dead-letter queue")
    assert letter.message_id == str(order.event_id)
    assert letter.user_id == f"{name_prefix}accessprobe"
    assert (letter.headers or {})[ORIGINAL_USER] == f"{name_prefix}order"
    assert (letter.headers or {})["x-attempts"] == 2


async def test_a_service_may_not_publish_what_another_produces(
        users: Provision, amqp_url: str, name_prefix: str) -> None:
    """Seller's user cannot publish StockReserved or OrderPlaced, reach a queue through the
    default exchange, or claim another user's name on a message it may publish."""
    passwords = await users([ORDER, INVENTORY, SELLER])
    topology = Topology(name_prefix)
    connection = await aio_pika.connect(login(amqp_url, f"{name_prefix}seller",
                                              passwords["seller"]))
    try:
        for exchange_name in (f"{name_prefix}stock.reserved", f"{name_prefix}order.placed"):
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(exchange_name, ensure=False)
            with pytest.raises(ChannelAccessRefused):
                await exchange.publish(aio_pika.Message(b"{}"), routing_key="")
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelAccessRefused):
            await channel.default_exchange.publish(
                aio_pika.Message(b"{}"), routing_key=topology.queue("inventory", OrderPlaced))
        channel = await connection.channel(publisher_confirms=True)
        audit = await channel.get_exchange(topology.audit_exchange, ensure=False)
        with pytest.raises(ChannelPreconditionFailed):
            await audit.publish(aio_pika.Message(b"{}", user_id=f"{name_prefix}inventory"),
                                routing_key="")
        channel = await connection.channel()
        queue = await channel.get_queue(topology.queue("inventory", OrderPlaced), ensure=False)
        with pytest.raises(ChannelAccessRefused):
            await queue.consume(ignore)
    finally:
        await connection.close()



async def parked(amqp: aio_pika.abc.AbstractConnection, dlq: str, count: int
                 ) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Wait until `count` dead letters are in `dlq`, and take them."""
    channel = await amqp.channel()
    found: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def enough() -> bool:
        queue = await channel.declare_queue(dlq, passive=True)
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            found.append(message)
        return len(found) >= count

    await wait_for(enough, timeout=15, what=f"{count} dead letters in {dlq}")
    await channel.close()
    return found


async def test_the_tracker_parks_what_the_broker_does_not_vouch_for(
        users: Provision, start_service: StartService, amqp: aio_pika.abc.AbstractConnection,
        amqp_url: str, name_prefix: str) -> None:
    """With a user per service, the order service believes the broker, not the body: a
    receipt or an announcement one subscriber sends for another, an event whose body names
    another producer, a message from a user that is no service, and an outcome for an order
    it never placed are each parked as dead letters with the reason; the seller's own
    announcement is registered."""
    passwords = await users([ORDER, INVENTORY, SELLER])
    order_rt = await start_service(order, broker_password=passwords["order"])
    topology = order_rt.topology

    async def publish_as(service: str | None, *events: Event) -> None:
        url = login(amqp_url, f"{name_prefix}{service}", passwords[service]) if service \
            else amqp_url
        connection = await aio_pika.connect_robust(url)
        try:
            publisher = Publisher(connection, topology)
            for event in events:
                await publisher.publish(event)
        finally:
            await connection.close()

    placed = make_order(producer="order")
    for_inventory = DeliveryReceipt(
        subscriber="inventory", queue=topology.queue("inventory", OrderPlaced),
        handled_event_id=str(placed.event_id), handled_event_type="OrderPlaced",
        outcome="handled", received_at=placed.occurred_at, duration_ms=1,
        correlation_id=str(placed.order_id), producer="seller")
    ghost = SubscriberAnnounced(subscriber="ghost", instance="x", producer="seller",
                                consumes={"OrderPlaced": topology.queue("ghost", OrderPlaced)})
    honest = SubscriberAnnounced(subscriber="seller", instance="x", producer="seller",
                                 consumes={"OrderPlaced": topology.queue("seller", OrderPlaced)})
    await publish_as("seller", for_inventory,
                     for_inventory.model_copy(update={"producer": "inventory"}), ghost, honest)
    stray = StockReserved(order_id=placed.order_id, correlation_id=str(placed.order_id),
                          lines=(ReservedLine(sku="SKU-1", quantity=1),), producer="inventory")
    await publish_as("inventory", stray)
    await publish_as(None, stray.model_copy(update={"event_id": uuid.uuid4()}))

    audit = await parked(amqp, topology.dlq(topology.audit_queue), 3)
    assert [(m.type, (m.headers or {})["x-error-reason"]) for m in audit] == [
        ("DeliveryReceipt", "forged_producer"), ("DeliveryReceipt", "forged_producer"),
        ("SubscriberAnnounced", "forged_producer")]
    assert "speaks for inventory" in str((audit[0].headers or {})["x-exception-message"])
    outcomes = await parked(amqp, topology.dlq(topology.queue("order", StockReserved)), 2)
    assert sorted(str((m.headers or {})["x-error-reason"]) for m in outcomes) == [
        "forged_producer", "unknown_order"]

    async def registry() -> set[str] | None:
        async with order_rt.engine.connect() as conn:
            names = {s.name for s in await OrderStore(conn).list_subscribers()}
        return names if "seller" in names else None

    assert "ghost" not in await wait_for(registry, what="the seller's own announcement")
