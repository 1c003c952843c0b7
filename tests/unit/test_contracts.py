"""The event contracts: the catalog, the AsyncAPI document, `shop events` and
`GET /asyncapi.json`, over services declared here as the real ones are."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
import pytest
from jsonschema import Draft7Validator, Draft202012Validator
from pydantic import SecretStr
from typer.testing import CliRunner

from common import contracts
from common.events import (
    EVENT_TYPES,
    DeliveryReceipt,
    DeliveryReceipts,
    Event,
    OrderPlaced,
    ReservedLine,
    SellerNotified,
    ShipmentScheduled,
    StockReservationFailed,
    StockReserved,
    SubscriberAnnounced,
)
from common.kit import discovery
from common.kit.broker import message_for
from common.kit.declare import Service
from common.kit.topology import Topology
from common.ops import cli
from order_service.api.app import create_app
from order_service.api.asyncapi import asyncapi_router
from order_service.settings import OrderSettings
from tests.factories import make_order

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
#: The AsyncAPI Initiative's JSON Schema of AsyncAPI 3.0.0 (tests/specs/README.md).
SPEC = json.loads((ROOT / "tests/specs/asyncapi-3.0.0.schema.json").read_text())
BROKER = "amqp://guest:guest@localhost:5672/"


class PointsAwarded(Event):
    """An event a service defines in its own package."""

    routing: ClassVar[str] = "points.awarded"
    event_type: Literal["PointsAwarded"] = "PointsAwarded"
    points: int


def shop() -> list[Service[Any]]:
    """The system as its services declare it: the order service places orders and tracks
    the outcomes and receipts (keeping its own), three subscribers react, and a fourth
    publishes an event of its own."""
    order: Service[Any] = Service("order")
    order.produces(OrderPlaced)
    for outcome in (StockReserved, StockReservationFailed, ShipmentScheduled, SellerNotified):
        order.handles(outcome)(_ignore)
    for audit in (SubscriberAnnounced, DeliveryReceipt, DeliveryReceipts):
        order.tracks(audit)(_ignore)
    order.keeps_receipts(_keep)

    inventory: Service[Any] = Service("inventory")

    @inventory.handles(OrderPlaced)
    async def reserve(event: OrderPlaced) -> StockReserved | StockReservationFailed:
        return StockReserved(order_id=event.order_id,
                             lines=(ReservedLine(sku="SKU-1", quantity=1),))

    logistics: Service[Any] = Service("logistics")
    logistics.handles(OrderPlaced, produces=[ShipmentScheduled])(_ignore)
    seller: Service[Any] = Service("seller")
    seller.handles(OrderPlaced, produces=[SellerNotified])(_ignore)
    loyalty: Service[Any] = Service("loyalty")
    loyalty.handles(OrderPlaced, produces=[PointsAwarded])(_ignore)
    return [order, inventory, logistics, seller, loyalty]


async def _ignore(event: Event) -> None:
    return None


async def _keep(store: Any, receipts: Sequence[DeliveryReceipt]) -> None:
    return None


def by_name(found: list[contracts.EventContract]) -> dict[str, contracts.EventContract]:
    return {c.name: c for c in found}


def spec_errors(document: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in Draft7Validator(SPEC).iter_errors(document)]


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from references(value)
    elif isinstance(node, list):
        for value in node:
            yield from references(value)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


# --- the catalog --------------------------------------------------------------------------

def test_the_catalog_names_each_events_exchange_producers_and_subscribers() -> None:
    """Exchange and queues under the prefix, producers from what each service produces,
    subscribers from what it handles or tracks, with their queues."""
    found = by_name(contracts.catalog(shop(), Topology("t_")))
    placed = found["OrderPlaced"]
    assert (placed.exchange, placed.schema_version, placed.producers) == (
        "t_order.placed", 1, ("order",))
    assert [(s.service, s.queue) for s in placed.subscribers] == [
        ("inventory", "t_inventory.order.placed"), ("logistics", "t_logistics.order.placed"),
        ("seller", "t_seller.order.placed"), ("loyalty", "t_loyalty.order.placed")]
    assert found["StockReservationFailed"].producers == ("inventory",)
    assert [(s.service, s.queue) for s in found["ShipmentScheduled"].subscribers] == [
        ("order", "t_order.shipment.scheduled")]
    assert found["PointsAwarded"].producers == ("loyalty",)
    assert found["PointsAwarded"].subscribers == ()


def test_the_kits_own_events_name_who_really_sends_them() -> None:
    """Every consumer announces itself; receipts come from every consumer but the one that
    keeps its own (the tracker), which reads them from the audit queue; a single receipt
    only from the DLQ replay tool."""
    found = by_name(contracts.catalog(shop(), Topology()))
    assert found["SubscriberAnnounced"].producers == (
        "order", "inventory", "logistics", "seller", "loyalty")
    assert found["DeliveryReceipts"].producers == ("inventory", "logistics", "seller",
                                                   "loyalty")
    assert found["DeliveryReceipt"].producers == (contracts.REPLAY_TOOL,)
    assert {(s.service, s.queue) for s in found["DeliveryReceipts"].subscribers} == {
        ("order", "audit.tracker")}
    assert all(found[n].exchange == "audit" and found[n].kit
               for n in ("SubscriberAnnounced", "DeliveryReceipt", "DeliveryReceipts"))


def test_with_no_service_installed_every_event_is_still_listed() -> None:
    """Before any service declares itself, each event of common.events has its exchange
    and version, and no producer or subscriber is made up."""
    found = contracts.catalog([], Topology())
    assert [c.name for c in found] == list(EVENT_TYPES)
    assert all(not c.subscribers for c in found)
    assert [c.name for c in found if c.producers] == ["DeliveryReceipt"]


# --- the AsyncAPI document ----------------------------------------------------------------

@pytest.mark.parametrize(("services", "prefix", "url"), [
    (shop, "", BROKER), (shop, "t/1~.", "amqps://h.example:5671/shop"), (list, "", None)],
    ids=["system", "prefix-and-vhost", "no-services"])
def test_the_document_is_valid_asyncapi_3(services: Any, prefix: str, url: str | None
                                          ) -> None:
    """The official AsyncAPI 3.0.0 JSON Schema, AMQP bindings 0.3.0 included, accepts it;
    and every reference in it points at something that exists."""
    document = contracts.asyncapi(services(), Topology(prefix), broker_url=url)
    assert document["asyncapi"] == "3.0.0"
    assert spec_errors(document) == []
    for ref in references(document):
        assert resolve(document, ref) is not None, ref


def test_the_validator_refuses_a_document_the_specification_does_not_allow() -> None:
    """The structural check is a real one: an unknown exchange type, an operation without
    an action and a message field the spec does not have are each refused."""
    document = contracts.asyncapi(shop(), Topology(), broker_url=BROKER)
    document["channels"]["order.placed"]["bindings"]["amqp"]["exchange"]["type"] = "fan"
    del document["operations"]["send.order.order.placed"]["action"]
    document["components"]["messages"]["OrderPlaced"]["routing"] = "order.placed"
    assert len(spec_errors(document)) == 3


def test_two_event_models_of_one_class_name_keep_their_own_schemas() -> None:
    """Services define events in their own packages: two classes both called PointsAwarded
    each get their own payload schema."""

    class PointsAwarded(Event):  # the same name as the module's, on purpose
        routing: ClassVar[str] = "rewards.points"
        event_type: Literal["RewardsGranted"] = "RewardsGranted"
        rewards: str

    rewards: Service[Any] = Service("rewards")
    rewards.produces(PointsAwarded)
    document = contracts.asyncapi([*shop(), rewards], Topology())
    assert spec_errors(document) == []
    messages = document["components"]["messages"]
    assert "points" in resolve(document, messages["PointsAwarded"]["payload"]["$ref"])[
        "properties"]
    assert "rewards" in resolve(document, messages["RewardsGranted"]["payload"]["$ref"])[
        "properties"]


def test_a_queue_named_as_an_exchange_is_refused() -> None:
    """A service `stock` consuming an event routed `reserved` would own a queue named as
    StockReserved's exchange: the document says so rather than merging the two."""

    class Reserved(Event):
        routing: ClassVar[str] = "reserved"
        event_type: Literal["Reserved"] = "Reserved"

    stock: Service[Any] = Service("stock")
    stock.handles(Reserved)(_ignore)
    with pytest.raises(ValueError, match=r"'stock\.reserved' names both an exchange and a queue"):
        contracts.asyncapi([stock], Topology())


def test_every_exchange_queue_producer_and_consumer_is_in_the_document() -> None:
    """A durable fanout channel per exchange, a durable queue channel per subscriber queue
    (with the exchanges it is bound to), a send per producer (persistent, mandatory, as its
    broker user) and a receive per consumer (acked)."""
    document = contracts.asyncapi(shop(), Topology(), broker_url=BROKER)
    channels, operations = document["channels"], document["operations"]
    for c in contracts.catalog(shop(), Topology()):
        exchange = channels[c.exchange]
        assert exchange["bindings"]["amqp"]["exchange"] | {"name": "-"} == {
            "name": "-", "type": "fanout", "durable": True, "autoDelete": False, "vhost": "/"}
        assert c.name in exchange["messages"]
        for producer in c.producers:
            send = operations[f"send.{'-'.join(producer.split())}.{c.exchange}"]
            assert send["action"] == "send"
            assert send["bindings"]["amqp"]["deliveryMode"] == 2
            assert send["bindings"]["amqp"]["mandatory"] is True
            assert f"#/channels/{c.exchange}/messages/{c.name}" in [
                m["$ref"] for m in send["messages"]]
        for sub in c.subscribers:
            queue = channels[sub.queue]
            assert queue["bindings"]["amqp"]["queue"]["durable"] is True
            assert c.exchange in queue["x-bound-to"]
            receive = operations[f"receive.{sub.queue}"]
            assert (receive["action"], receive["x-consumer"]) == ("receive", sub.service)
            assert receive["bindings"]["amqp"]["ack"] is True
    assert operations["send.inventory.stock.reserved"]["bindings"]["amqp"]["userId"] == \
        "inventory"
    assert document["servers"]["rabbitmq"] == {
        "host": "localhost:5672", "pathname": "/", "protocol": "amqp",
        "protocolVersion": "0-9-1", "description": "RabbitMQ: the virtual host is the path."}
    assert "guest" not in json.dumps(document)


ORDER = make_order(producer="order")


@pytest.mark.parametrize("event", [
    ORDER,
    StockReserved(order_id=ORDER.order_id, lines=(ReservedLine(sku="S", quantity=2),)
                  ).caused(ORDER, "inventory"),
    ShipmentScheduled(order_id=ORDER.order_id, shipment_id=ORDER.order_id, carrier="DHL",
                      tracking_number="T-1", estimated_delivery=ORDER.occurred_at.date()
                      ).caused(ORDER, "logistics"),
], ids=lambda e: e.event_type)
def test_a_message_the_kit_publishes_matches_the_document(event: Event) -> None:
    """The body the kit publishes validates against its payload schema in the document, its
    headers against the message's headers schema, and every AMQP property the document
    lists is set on it."""
    document = contracts.asyncapi(shop(), Topology())
    message = message_for(event, user_id="order")
    described = document["components"]["messages"][event.event_type]
    payload = {**document, "$ref": described["payload"]["$ref"]}
    Draft202012Validator(payload).validate(json.loads(message.body))
    Draft202012Validator(described["headers"]).validate(message.headers)
    assert described["bindings"]["amqp"]["x-properties"] == contracts.AMQP_PROPERTIES
    for name in contracts.AMQP_PROPERTIES:
        assert getattr(message, name) is not None, name
    assert int(message.delivery_mode) == 2
    assert (message.message_id, message.type, message.content_type) == (
        str(event.event_id), event.event_type, contracts.CONTENT_TYPE)


# --- shop events ----------------------------------------------------------------------------

@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> list[Service[Any]]:
    """Discovery finds the services declared here."""
    services = shop()
    monkeypatch.setattr(discovery, "services", lambda: {s.name: s for s in services})
    return services


def test_shop_events_lists_each_event_with_its_producers_and_subscribers(
        installed: list[Service[Any]]) -> None:
    """`--json` prints the catalog, and nothing else, on stdout; the table names the same,
    uncut on a pipe."""
    result = CliRunner().invoke(cli.app, ["events", "--json"],
                                env={"SHOP_NAME_PREFIX": "t_"})
    assert result.exit_code == 0, result.output
    listed = {e["event"]: e for e in json.loads(result.stdout)}
    assert listed["OrderPlaced"]["exchange"] == "t_order.placed"
    assert listed["OrderPlaced"]["producers"] == ["order"]
    assert {"service": "loyalty", "queue": "t_loyalty.order.placed"} in \
        listed["OrderPlaced"]["subscribers"]
    table = CliRunner().invoke(cli.app, ["events"], env={"SHOP_NAME_PREFIX": "t_"})
    assert table.exit_code == 0, table.output
    assert "t_stock.reservation_failed" in table.stdout
    assert "loyalty (t_loyalty.order.placed)" in table.stdout


def test_shop_events_asyncapi_prints_the_document(installed: list[Service[Any]]) -> None:
    """stdout is the AsyncAPI document alone, valid, with the services discovery found."""
    result = CliRunner().invoke(cli.app, ["events", "asyncapi"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert spec_errors(document) == []
    assert "receive.loyalty.order.placed" in document["operations"]


def test_without_services_shop_events_says_so_on_stderr(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No service installed: the events are listed, and stderr says why nobody produces
    them."""
    monkeypatch.setattr(discovery, "services", dict)
    result = CliRunner().invoke(cli.app, ["events", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == len(EVENT_TYPES)
    assert "no service is installed" in result.stderr


# --- GET /asyncapi.json ---------------------------------------------------------------------

async def test_the_order_api_serves_the_document_behind_its_token(tmp_path: Path) -> None:
    """GET /asyncapi.json answers the valid document, even before the service runs; with a
    token set, only to a caller that sends it, as every endpoint but the docs."""
    token = "t" * 32
    app = create_app(None, OrderSettings(data_dir=tmp_path, api_token=SecretStr(token)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://localhost") as client:
        refused = await client.get("/asyncapi.json")
        answer = await client.get("/asyncapi.json",
                                  headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert spec_errors(answer.json()) == []


async def test_the_route_documents_the_services_it_is_given(tmp_path: Path) -> None:
    """The router takes the services (discovery's by default), so the real ones plug in
    unchanged; it answers what `shop events asyncapi` prints."""
    import fastapi

    settings = OrderSettings(data_dir=tmp_path, name_prefix="t_")
    services = {s.name: s for s in shop()}
    app = fastapi.FastAPI()
    app.include_router(asyncapi_router(settings, lambda: services))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://localhost") as client:
        served = (await client.get("/asyncapi.json")).json()
    assert served == contracts.asyncapi(services.values(), Topology("t_"),
                                        broker_url=settings.amqp_url)
