"""The order HTTP API over a fake runtime (no broker; SQLite and PostgreSQL): input, status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from common.events import DeliveryReceipt, Event, OrderPlaced, SubscriberAnnounced
from common.kit.db import create_tables, make_engine
from order_service.api.app import create_app
from order_service.api.dependencies import OrderRuntime
from order_service.api.orders import PAGE_MAX, decode_cursor, encode_cursor
from order_service.domain.order import NewOrder, place_order
from order_service.service import service
from order_service.settings import OrderSettings
from order_service.store import OrderStore
from order_service.store.status import Position
from order_service.store.tables import metadata, orders
from order_service.tracker import settle_forever
from tests.factories import make_address, make_line
from tests.integration.support import FakeRuntime, order_body, wait_for

pytestmark = pytest.mark.integration

MAX_BODY = 4096


API_TOKEN = "api-token-0123456789abcdef"
OPERATOR_TOKEN = "operator-token-0123456789abcdef"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(tmp_path: Path) -> OrderSettings:
    # Tokens given as None, so a developer's own SHOP_*_TOKEN does not change the tests.
    return OrderSettings(max_body_bytes=MAX_BODY, data_dir=tmp_path, api_token=None,
                         operator_token=None)


@contextlib.asynccontextmanager
async def api(runtime: FakeRuntime | None, settings: OrderSettings,
              headers: dict[str, str] | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API over `runtime`, addressing it as localhost."""
    app = create_app(runtime, settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://localhost", headers=headers) as client:
        yield client


@pytest.fixture
async def client(runtime: FakeRuntime, settings: OrderSettings
                 ) -> AsyncIterator[httpx.AsyncClient]:
    async with api(runtime, settings) as client:
        yield client




async def audit(runtime: FakeRuntime, event: Event) -> None:
    """What the order service's tracker does with an audit event, in one transaction."""
    spec = service.spec(runtime.settings)
    async with runtime.engine.begin() as conn:
        await spec.audit_handlers[type(event)](event, spec.store(conn))


def test_fake_runtime_satisfies_the_protocol(runtime: FakeRuntime) -> None:
    """The fake offers what the API asks of the real runtime."""
    checked: OrderRuntime = runtime
    assert checked is runtime


async def test_a_valid_order_is_accepted_and_published_once(client: httpx.AsyncClient,
                                                             runtime: FakeRuntime) -> None:
    """202 with the order id and status URL; exactly one OrderPlaced goes to the outbox."""
    response = await client.post("/orders", json=order_body())
    assert response.status_code == 202, response.text
    body = response.json()
    order_id = uuid.UUID(body["order_id"])
    assert body["status_url"] == f"/orders/{order_id}"
    assert response.headers["location"] == body["status_url"]
    assert body["state"] == "accepted"
    assert body["order"]["total"] == "39.98"
    [event] = runtime.published
    assert isinstance(event, OrderPlaced)
    assert event.order_id == order_id
    assert event.correlation_id == str(order_id)
    assert event.producer == "order"


async def test_status_of_a_placed_order(client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """GET the status URL: the order, its state, expected subscribers and their answers."""
    await audit(runtime, SubscriberAnnounced(subscriber="inventory", instance="h:1",
                                             consumes={"OrderPlaced": "inventory.order.placed"}))
    await audit(runtime, SubscriberAnnounced(subscriber="seller", instance="h:2",
                                             consumes={"OrderPlaced": "seller.order.placed"}))
    placed = (await client.post("/orders", json=order_body())).json()
    [event] = runtime.published
    await audit(runtime, DeliveryReceipt(
        subscriber="inventory", queue="inventory.order.placed",
        handled_event_id=str(event.event_id), handled_event_type="OrderPlaced",
        outcome="handled", received_at=event.occurred_at, duration_ms=3.0,
        correlation_id=event.correlation_id))
    response = await client.get(placed["status_url"])
    assert response.status_code == 200
    status = response.json()
    assert status["state"] == "placed"
    assert status["complete"] is False
    assert {s["name"]: s["status"] for s in status["subscribers"]} == {
        "inventory": "handled", "seller": "pending"}
    assert status["order"]["customer_id"] == "cust-1"
    listed = (await client.get("/orders")).json()
    assert [(o["order_id"], o["handled"], o["pending"]) for o in listed] == [
        (placed["order_id"], 1, 1)]
    registry = (await client.get("/subscribers")).json()
    assert [s["name"] for s in registry] == ["inventory", "seller"]


@pytest.fixture
async def operator(runtime: FakeRuntime, settings: OrderSettings
                   ) -> AsyncIterator[httpx.AsyncClient]:
    """A client sending the operator token to a service that has one."""
    with_operator = settings.model_copy(update={"operator_token": SecretStr(OPERATOR_TOKEN)})
    async with api(runtime, with_operator, bearer(OPERATOR_TOKEN)) as client:
        yield client


async def test_a_retired_subscriber_is_no_longer_expected_by_new_orders(
        operator: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """DELETE /subscribers/{name}: refused (409) while it still announces itself unless
    forced, 404 when unknown; orders placed afterwards do not expect it, earlier ones still
    do."""
    client = operator
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    await audit(runtime, SubscriberAnnounced(subscriber="inventory", instance="h:1",
                                             consumes={"OrderPlaced": "inventory.order.placed"}))
    await audit(runtime, SubscriberAnnounced(subscriber="seller", instance="h:2",
                                             consumes={"OrderPlaced": "seller.order.placed"},
                                             occurred_at=long_ago))
    before = (await client.post("/orders", json=order_body())).json()

    running = await client.delete("/subscribers/inventory")
    assert running.status_code == 409, running.text
    assert "force=true" in running.json()["detail"]
    gone = await client.delete("/subscribers/seller")
    assert gone.status_code == 200, gone.text
    assert gone.json()["consumes"] == {"OrderPlaced": "seller.order.placed"}
    again = await client.delete("/subscribers/seller")
    assert again.status_code == 404
    assert "seller" in again.json()["detail"]

    after = (await client.post("/orders", json=order_body())).json()
    expected_after = (await client.get(after["status_url"])).json()["subscribers"]
    expected_before = (await client.get(before["status_url"])).json()["subscribers"]
    assert [s["name"] for s in expected_after] == ["inventory"]
    assert [s["name"] for s in expected_before] == ["inventory", "seller"]

    forced = await client.delete("/subscribers/inventory", params={"force": "true"})
    assert forced.status_code == 200, forced.text
    assert (await client.get("/subscribers")).json() == []


async def answered_and_silent(runtime: FakeRuntime) -> tuple[OrderPlaced, OrderPlaced]:
    """Two orders placed an hour ago, expected by inventory: one answered, one not."""
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    await audit(runtime, SubscriberAnnounced(subscriber="inventory", instance="h:1",
                                             consumes={"OrderPlaced": "inventory.order.placed"},
                                             occurred_at=long_ago - timedelta(minutes=1)))
    answered, silent = (place_order(NewOrder(customer_id="cust-1", lines=[make_line("SKU-1")],
                                             shipping_address=make_address()), now=long_ago)
                        for _ in range(2))
    async with runtime.engine.begin() as conn:
        for order in (answered, silent):
            await OrderStore(conn).add_order(order)
    await audit(runtime, DeliveryReceipt(
        subscriber="inventory", queue="inventory.order.placed",
        handled_event_id=str(answered.event_id), handled_event_type="OrderPlaced",
        outcome="handled", received_at=long_ago, duration_ms=1.0,
        correlation_id=answered.correlation_id))
    return answered, silent


async def still_open(runtime: FakeRuntime) -> set[str]:
    async with runtime.engine.connect() as conn:
        return set((await conn.execute(
            sa.select(orders.c.order_id).where(orders.c.settled_at.is_(None)))).scalars())


async def test_the_late_list_settles_the_answered_orders_for_later_looks(
        client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """GET /orders?late=true lists the order its subscriber left unanswered, and marks the
    answered one settled, so the next looks (the page asks every few seconds) skip it."""
    _answered, silent = await answered_and_silent(runtime)

    response = await client.get("/orders", params={"late": "true"})

    assert response.status_code == 200, response.text
    assert [o["order_id"] for o in response.json()] == [str(silent.order_id)]
    assert await still_open(runtime) == {str(silent.order_id)}


async def test_answered_orders_are_settled_in_the_background_with_nobody_looking(
        runtime: FakeRuntime) -> None:
    """What the service runs beside its API: answered orders past the deadline are settled
    without a look at late orders, so the first look after a quiet spell is short."""
    _answered, silent = await answered_and_silent(runtime)
    settling = asyncio.create_task(settle_forever(runtime.commits, timedelta(seconds=30),
                                                  every=0.05))
    try:
        async def settled() -> bool:
            return await still_open(runtime) == {str(silent.order_id)}

        await wait_for(settled, timeout=10, what="the answered order to be settled")
    finally:
        settling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await settling


def fields_in(response: httpx.Response) -> set[str]:
    return {".".join(map(str, e["loc"][1:])) for e in response.json()["detail"]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (order_body(customer_id=None), "customer_id"),
        ({k: v for k, v in order_body().items() if k != "shipping_address"}, "shipping_address"),
        (order_body(lines="SKU-1"), "lines"),
        (order_body(lines=[{"sku": "A", "quantity": "many", "unit_price": "1",
                            "seller_id": "s"}]), "lines.0.quantity"),
        (order_body(lines=[{"sku": "A", "quantity": 0, "unit_price": "1",
                            "seller_id": "s"}]), "lines.0.quantity"),
        (order_body(lines=[{"sku": "A", "quantity": -3, "unit_price": "1",
                            "seller_id": "s"}]), "lines.0.quantity"),
        (order_body(lines=[{"sku": "A", "quantity": 1, "unit_price": "-1",
                            "seller_id": "s"}]), "lines.0.unit_price"),
        (order_body(total="1.00"), "total"),
        (order_body(currency="EURO"), "currency"),
        (order_body(currency="XYZ"), "currency"),
        (order_body(shipping_address={"name": "Ada", "street": "1 Row", "city": "Berlin",
                                      "postal_code": "10115", "country": "Germany"}),
         "shipping_address.country"),
    ],
)
async def test_bad_input_is_refused_field_by_field_and_nothing_is_published(
        client: httpx.AsyncClient, runtime: FakeRuntime, body: dict[str, Any],
        field: str) -> None:
    """422 names the field at fault with a message; nothing is stored or published."""
    response = await client.post("/orders", json=body)
    assert response.status_code == 422
    assert field in fields_in(response)
    assert all(e["msg"] for e in response.json()["detail"])
    assert runtime.published == []
    assert (await client.get("/orders")).json() == []


async def test_a_total_that_does_not_add_up_says_so(client: httpx.AsyncClient,
                                                    runtime: FakeRuntime) -> None:
    """The 422 for a wrong total gives both amounts."""
    response = await client.post("/orders", json=order_body(total="10.00"))
    [error] = response.json()["detail"]
    assert "10.00" in error["msg"]
    assert "39.98" in error["msg"]
    assert runtime.published == []


async def test_a_body_that_is_not_json_is_refused(client: httpx.AsyncClient,
                                                 runtime: FakeRuntime) -> None:
    """Broken JSON is a 400 (a malformed request, no field to name), not a server error."""
    response = await client.post("/orders", content=b"{not json",
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert runtime.published == []


async def test_an_oversized_body_is_refused_by_its_content_length(
        client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """A body over the limit gets 413 with the limit in the message; nothing is published."""
    body = order_body(customer_id="c" * 10, padding="x" * MAX_BODY)
    response = await client.post("/orders", json=body)
    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"request body too large: the limit is {MAX_BODY} bytes")
    assert runtime.published == []


async def test_an_oversized_body_without_content_length_is_refused(
        client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """A chunked body is counted as it arrives: leaving Content-Length out does not help."""
    payload = json.dumps(order_body(padding="x" * MAX_BODY)).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 1000):
            yield payload[start:start + 1000]

    response = await client.post("/orders", content=chunks(),
                                 headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert runtime.published == []


async def test_a_chunked_body_within_the_limit_is_accepted(
        client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """The size check replays a small chunked body intact to the endpoint."""
    payload = json.dumps(order_body()).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 50):
            yield payload[start:start + 50]

    response = await client.post("/orders", content=chunks(),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text
    assert len(runtime.published) == 1


async def test_an_unknown_order_is_404(client: httpx.AsyncClient) -> None:
    """A well-formed id that names no order: 404 with a message."""
    order_id = uuid.uuid4()
    response = await client.get(f"/orders/{order_id}")
    assert response.status_code == 404
    assert response.json()["detail"] == f"order {order_id} not found"


async def test_an_order_id_that_is_not_a_uuid_is_422(client: httpx.AsyncClient) -> None:
    """A malformed id is refused as input, not looked up."""
    assert (await client.get("/orders/not-a-uuid")).status_code == 422


async def store_orders(runtime: FakeRuntime, times: Sequence[datetime]) -> list[OrderPlaced]:
    """Orders placed at these times, stored as the API stores them."""
    placed = [place_order(NewOrder(customer_id="cust-1", lines=[make_line("SKU-1")],
                                   shipping_address=make_address()), now=at) for at in times]
    async with runtime.engine.begin() as conn:
        for order in placed:
            await OrderStore(conn).add_order(order)
    return placed


async def walk(client: httpx.AsyncClient, params: dict[str, Any]
               ) -> tuple[list[list[str]], list[str]]:
    """Every page of GET /orders, following the Link headers: the order ids page by page,
    and the links followed."""
    pages: list[list[str]] = []
    links: list[str] = []
    response = await client.get("/orders", params=params)
    while True:
        assert response.status_code == 200, response.text
        pages.append([o["order_id"] for o in response.json()])
        assert len(pages) <= 10, f"the pages do not end: {pages}"
        following = response.links.get("next")
        if following is None:
            return pages, links
        links.append(following["url"])
        response = await client.get(response.url.join(following["url"]))


async def test_the_list_pages_through_every_order_once_with_the_link_header(
        client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """limit=2 over five orders, three placed at the same instant: three pages, linked by
    `Link: <...cursor...>; rel="next"` (none on the last), together the one list in its
    order, each order once."""
    now = datetime.now(UTC)
    same = now - timedelta(minutes=1)
    await store_orders(runtime, [now - timedelta(minutes=2), same, same, same, now])
    whole = [o["order_id"] for o in (await client.get("/orders")).json()]
    assert len(whole) == 5

    pages, links = await walk(client, {"limit": 2})

    assert [len(page) for page in pages] == [2, 2, 1]
    assert [order_id for page in pages for order_id in page] == whole
    assert all(link.startswith("/orders?limit=2&cursor=") for link in links)


async def test_the_late_list_pages_too(client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """late=true, limit=1 over two late orders: two pages, the link keeps late=true."""
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    await audit(runtime, SubscriberAnnounced(subscriber="inventory", instance="h:1",
                                             consumes={"OrderPlaced": "inventory.order.placed"},
                                             occurred_at=long_ago - timedelta(minutes=1)))
    silent = await store_orders(runtime, [long_ago, long_ago + timedelta(seconds=1)])
    await store_orders(runtime, [datetime.now(UTC)])  # not late yet

    pages, links = await walk(client, {"limit": 1, "late": "true"})

    assert pages == [[str(silent[1].order_id)], [str(silent[0].order_id)]]
    assert "late=true" in links[0]


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "limit"), ({"limit": PAGE_MAX + 1}, "limit"),
    ({"cursor": "not-a-cursor"}, "cursor"), ({"cursor": "x" * 65}, "cursor")])
async def test_page_size_and_cursor_are_checked(client: httpx.AsyncClient,
                                                params: dict[str, Any], field: str) -> None:
    """A page of 1 to PAGE_MAX orders; a cursor must be one the API gave out: 422 naming
    the parameter otherwise."""
    response = await client.get("/orders", params=params)
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [["query", field]]


async def test_a_cursor_is_opaque_but_stands_for_the_last_order_of_its_page() -> None:
    """encode/decode round-trip the page's last order (time to the microsecond, and id)."""
    position = Position(datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), uuid.uuid4())
    cursor = encode_cursor(position)
    assert cursor.isascii()
    assert "=" not in cursor
    assert len(cursor) == 32
    assert decode_cursor(cursor) == position


async def test_a_page_lets_the_event_loop_serve_others_while_it_is_read(tmp_path: Path,
                                                                        settings: OrderSettings
                                                                        ) -> None:
    """SQLite runs inline on the loop: reading a full page of orders gives the loop back
    between slices, so other requests (a health probe) are served meanwhile."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'inline.db'}")
    try:
        await create_tables(engine, metadata)
        runtime = FakeRuntime(engine, settings)
        await store_orders(runtime, [datetime.now(UTC)] * PAGE_MAX)
        turns = 0

        async def other() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        async with engine.connect() as conn:
            store = OrderStore(conn)
            await store.list_orders(1)  # the connection is open and warm: no thread hop
            ticking = asyncio.create_task(other())
            await asyncio.sleep(0)
            before = turns
            listed = await store.list_orders(PAGE_MAX)
            during = turns - before
            ticking.cancel()
        assert len(listed) == PAGE_MAX
        assert during >= PAGE_MAX // 50 - 1
    finally:
        await engine.dispose()


async def test_health_is_ok_when_broker_and_database_answer(client: httpx.AsyncClient) -> None:
    """200 with both checks true."""
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "broker": True, "database": True}


@pytest.mark.parametrize(("broker", "database"), [(False, True), (True, False)])
async def test_health_is_503_when_either_is_down(client: httpx.AsyncClient, runtime: FakeRuntime,
                                                 broker: bool, database: bool) -> None:
    """Either check failing (even by raising) makes the service unavailable."""
    runtime.broker_up, runtime.database_up = broker, database
    response = await client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "broker": broker, "database": database}


async def test_without_a_runtime_only_the_docs_answer(settings: OrderSettings) -> None:
    """create_app(None): OpenAPI docs work, everything else is 503."""
    app = create_app(None, settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://localhost") as client:
        assert (await client.get("/docs")).status_code == 200
        spec = (await client.get("/openapi.json")).json()
        assert {"/orders", "/orders/{order_id}", "/healthz", "/subscribers"} <= set(spec["paths"])
        assert (await client.post("/orders", json=order_body())).status_code == 503
        assert (await client.get("/healthz")).status_code == 503


async def test_an_order_is_accepted_while_the_broker_is_down(client: httpx.AsyncClient,
                                                             runtime: FakeRuntime) -> None:
    """No broker: still 202, the event is kept in the outbox, and the answer says so."""
    runtime.broker_up = False
    response = await client.post("/orders", json=order_body())
    assert response.status_code == 202, response.text
    assert "broker is unreachable" in response.json()["publication"]
    assert len(runtime.published) == 1


async def test_an_order_sent_again_with_its_idempotency_key_is_placed_once(
        client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """A retry after a lost answer: same key, same order -> the first answer again, marked
    replayed, and still one order and one OrderPlaced."""
    headers = {"Idempotency-Key": "retry-me"}
    first = await client.post("/orders", json=order_body(), headers=headers)
    again = await client.post("/orders", json=order_body(), headers=headers)
    assert first.status_code == again.status_code == 202, again.text
    assert again.json()["order_id"] == first.json()["order_id"]
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert len(runtime.published) == 1
    listed = (await client.get("/orders")).json()
    assert [o["order_id"] for o in listed] == [first.json()["order_id"]]


async def test_an_idempotency_key_reused_for_another_order_is_refused(
        client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """Same customer and key, different lines: 409 naming the first order; nothing placed.
    Another customer's key of the same value is theirs."""
    headers = {"Idempotency-Key": "k-1"}
    first = await client.post("/orders", json=order_body(), headers=headers)
    changed = order_body(lines=[{"sku": "SKU-BOOK-1", "quantity": 3, "unit_price": "19.99",
                                 "seller_id": "books"}])
    refused = await client.post("/orders", json=changed, headers=headers)
    assert refused.status_code == 409, refused.text
    assert first.json()["order_id"] in refused.json()["detail"]
    other = await client.post("/orders", json=order_body(customer_id="cust-2"), headers=headers)
    assert other.status_code == 202, other.text
    assert other.json()["order_id"] != first.json()["order_id"]
    assert len(runtime.published) == 2


@pytest.mark.parametrize("key", ["", "k" * 129])
async def test_a_malformed_idempotency_key_is_refused(client: httpx.AsyncClient,
                                                      runtime: FakeRuntime, key: str) -> None:
    response = await client.post("/orders", json=order_body(), headers={"Idempotency-Key": key})
    assert response.status_code == 422, response.text
    assert "Idempotency-Key" in response.text
    assert runtime.published == []


# --- who may use the API: tokens and the Host header --------------------------------------

def guarded(settings: OrderSettings, *, api_token: str | None = API_TOKEN,
            operator_token: str | None = OPERATOR_TOKEN) -> OrderSettings:
    return settings.model_copy(update={
        "api_token": SecretStr(api_token) if api_token else None,
        "operator_token": SecretStr(operator_token) if operator_token else None})


#: Every route but the open ones: (method, path, body).
GUARDED = [("POST", "/orders"), ("GET", "/orders"), ("GET", f"/orders/{uuid.uuid4()}"),
           ("GET", f"/orders/{uuid.uuid4()}/trace"), ("GET", "/subscribers"), ("GET", "/system"),
           ("DELETE", "/subscribers/old")]
OPEN = ["/healthz", "/", "/docs", "/redoc", "/openapi.json"]


async def test_with_an_api_token_every_route_but_the_open_ones_needs_it(
        runtime: FakeRuntime, settings: OrderSettings) -> None:
    """SHOP_API_TOKEN set: 401 with `WWW-Authenticate: Bearer` without it or with another
    token, on every route of the API; the health probe, the page and the docs stay open."""
    async with api(runtime, guarded(settings)) as client:
        for method, path in GUARDED:
            missing = await client.request(method, path, json=order_body())
            wrong = await client.request(method, path, json=order_body(),
                                         headers=bearer("not-the-token-0123456789"))
            assert (missing.status_code, wrong.status_code) == (401, 401), (method, path)
            assert missing.headers["www-authenticate"].startswith("Bearer")
            assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
            assert "SHOP_API_TOKEN" in missing.json()["detail"]
        for path in OPEN:
            assert (await client.get(path)).status_code == 200, path
        assert runtime.published == []


async def test_the_api_token_and_the_operator_token_both_let_a_client_in(
        runtime: FakeRuntime, settings: OrderSettings) -> None:
    """Either token places an order and reads the list."""
    for token in (API_TOKEN, OPERATOR_TOKEN):
        async with api(runtime, guarded(settings), bearer(token)) as client:
            assert (await client.post("/orders", json=order_body())).status_code == 202
            assert (await client.get("/orders")).status_code == 200
    assert len(runtime.published) == 2


async def test_without_tokens_the_api_is_open_but_operator_actions_are_off(
        client: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    """No token configured (loopback only): orders are placed and read without one; retiring
    a subscriber answers 403 saying how to turn operator actions on, and retires nothing."""
    await audit(runtime, SubscriberAnnounced(subscriber="old", instance="h:1",
                                             consumes={"OrderPlaced": "old.order.placed"}))
    assert (await client.post("/orders", json=order_body())).status_code == 202
    assert (await client.get("/orders")).status_code == 200
    refused = await client.delete("/subscribers/old", params={"force": "true"})
    assert refused.status_code == 403, refused.text
    assert "SHOP_OPERATOR_TOKEN" in refused.json()["detail"]
    assert [s["name"] for s in (await client.get("/subscribers")).json()] == ["old"]


@pytest.mark.parametrize("api_token", [API_TOKEN, None])
async def test_an_operator_action_needs_the_operator_token(
        runtime: FakeRuntime, settings: OrderSettings, api_token: str | None) -> None:
    """With or without an API token: no token or another one is 401; the API token is 403
    (not enough); the operator token gets through (404 here: nobody to retire)."""
    async with api(runtime, guarded(settings, api_token=api_token)) as client:
        tries = {"none": {}, "wrong": bearer("not-the-token-0123456789"),
                 "api": bearer(API_TOKEN), "operator": bearer(OPERATOR_TOKEN)}
        answers = {name: (await client.delete("/subscribers/old", headers=headers))
                   for name, headers in tries.items()}
    expected_api = 403 if api_token else 401  # without an API token configured it is unknown
    assert {n: r.status_code for n, r in answers.items()} == {
        "none": 401, "wrong": 401, "api": expected_api, "operator": 404}
    assert answers["none"].headers["www-authenticate"].startswith("Bearer")
    assert "SHOP_OPERATOR_TOKEN" in answers["api"].json()["detail"]


async def test_the_openapi_document_declares_the_bearer_schemes(
        runtime: FakeRuntime, settings: OrderSettings) -> None:
    """With an API token: every guarded operation names it (or the operator's) and its 401;
    the operator action names only the operator's; the health probe none. Without: only the
    operator action has a scheme."""
    async with api(runtime, guarded(settings)) as client:
        spec = (await client.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiToken"] == {"type": "http", "scheme": "bearer", "description": ANY_TEXT}
    assert schemes["OperatorToken"]["scheme"] == "bearer"
    paths = spec["paths"]
    for path, method in [("/orders", "post"), ("/orders", "get"), ("/orders/{order_id}", "get"),
                         ("/subscribers", "get"), ("/system", "get")]:
        assert paths[path][method]["security"] == [{"ApiToken": []}, {"OperatorToken": []}]
        assert "401" in paths[path][method]["responses"]
    assert paths["/subscribers/{name}"]["delete"]["security"] == [{"OperatorToken": []}]
    assert "security" not in paths["/healthz"]["get"]

    async with api(runtime, settings) as client:
        spec = (await client.get("/openapi.json")).json()
    assert set(spec["components"]["securitySchemes"]) == {"OperatorToken"}
    secured = {(p, m) for p, ops in spec["paths"].items() for m, op in ops.items()
               if "security" in op}
    assert secured == {("/subscribers/{name}", "delete")}


class _AnyText:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_TEXT: Any = _AnyText()


@pytest.mark.parametrize(("allowed", "host", "served"), [
    (None, "localhost:8000", True),
    (None, "127.0.0.1:8000", True),
    (None, "[::1]:8000", True),
    (None, "[::1]", True),
    (None, "LOCALHOST", True),
    (None, "attacker.example", False),
    (None, "attacker.example:8000", False),
    (None, "localhost.attacker.example", False),
    (None, "[::1]x", False),
    (None, "::1", False),
    (None, "", False),
    ("shop.example,[2001:db8::1]", "shop.example:443", True),
    ("shop.example,[2001:db8::1]", "[2001:db8::1]:8000", True),
    ("shop.example,[2001:db8::1]", "localhost:8000", False),
    ("*", "attacker.example", True),
])
async def test_a_request_for_another_host_is_refused(
        runtime: FakeRuntime, settings: OrderSettings, allowed: str | None, host: str,
        served: bool) -> None:
    """Only the Host names of ORDER_ALLOWED_HOSTS are served (default the loopback names,
    IPv6 literals in brackets, any port); another gets 400 saying what to set, so a page
    whose name was rebound to this machine reads nothing. `*` serves any."""
    if allowed is not None:
        hosts = OrderSettings.model_validate({"allowed_hosts": allowed}).allowed_hosts
        settings = settings.model_copy(update={"allowed_hosts": hosts})
    async with api(runtime, settings) as client:
        response = await client.get("/orders", headers={"Host": host})
    if served:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400, response.text
        assert "ORDER_ALLOWED_HOSTS" in response.json()["detail"]


async def test_the_health_probe_answers_whatever_the_host(client: httpx.AsyncClient) -> None:
    """A load balancer probing by address still gets /healthz; the rest of the API not."""
    assert (await client.get("/healthz", headers={"Host": "10.0.0.7:8000"})).status_code == 200
    assert (await client.get("/", headers={"Host": "10.0.0.7:8000"})).status_code == 400
