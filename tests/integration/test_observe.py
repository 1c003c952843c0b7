"""Expected vs actual on a real broker: late and failed subscribers per order, `GET /system`,
`shop doctor`, `shop queues` (once and live) and an order's trace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
import structlog
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncConnection
from typer.testing import CliRunner, Result

from common.events import Event, OrderPlaced
from common.kit.runner import Runtime, ServiceRunner
from common.kit.service import ServiceSpec
from common.kit.settings import ServiceSettings
from common.ops import cli, observe
from inventory_service.service import service as inventory
from logistics_service.service import service as logistics
from order_service.api.app import create_app
from order_service.service import service as order_svc
from order_service.settings import OrderSettings
from seller_service.service import service as seller
from tests.integration.support import StartService, serve_app, settings_for, wait_for

pytestmark = pytest.mark.integration

SUBSCRIBERS = {"inventory", "logistics", "seller"}
ORDER_BODY: dict[str, Any] = {
    "customer_id": "cust-observe",
    "lines": [{"sku": "SKU-BOOK-1", "quantity": 1, "unit_price": "12.50",
               "seller_id": "seller-books"}],
    "shipping_address": {"name": "Ada", "street": "1 Row", "city": "Berlin",
                         "postal_code": "10115", "country": "DE"},
}


@pytest.fixture(autouse=True)
def service_logs_off_the_cli_output() -> Iterator[None]:
    """In-process services log to the real stderr, so CliRunner's stdout is the CLI's alone."""
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.__stderr__))
    yield
    structlog.configure(**saved)


@pytest.fixture
def env(amqp_url: str, management_url: str, name_prefix: str) -> dict[str, str]:
    """What `shop` reads from the environment, for this test's prefix."""
    return {"AMQP_URL": amqp_url, "RABBITMQ_MANAGEMENT_URL": management_url,
            "SHOP_NAME_PREFIX": name_prefix, "COLUMNS": "250"}


async def shop(env: dict[str, str], *args: str) -> Result:
    """`shop ARGS` with `env`, in a thread: the command runs its own event loop."""
    return await asyncio.to_thread(CliRunner().invoke, cli.app, list(args), env=env)


async def start_order(start_service: StartService, management_url: str, **overrides: Any
                      ) -> Runtime[Any]:
    return await start_service(order_svc, management_url=management_url, **overrides)


async def registry(order: Runtime[Any], names: set[str]) -> bool:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api_of(order)),
                                 base_url="http://localhost") as client:
        known = {s["name"] for s in (await client.get("/subscribers")).json()}
    return names <= known


def api_of(order: Runtime[Any]) -> Any:
    settings = order.settings
    assert isinstance(settings, OrderSettings)
    return create_app(order, settings)


@pytest.fixture
async def client_factory() -> AsyncIterator[Any]:
    """Builds an HTTP client over the order API of a runtime (in-process, no socket)."""
    clients: list[httpx.AsyncClient] = []

    def make(order: Runtime[Any]) -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=api_of(order)),
                                   base_url="http://localhost")
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def place(client: httpx.AsyncClient) -> str:
    response = await client.post("/orders", json=ORDER_BODY)
    assert response.status_code == 202, response.text
    return str(response.json()["order_id"])


def statuses(status: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["status"] for s in status["subscribers"]}


# --- a subscriber that always fails, one that joins later ------------------------------

def probe(name: str, *, fail: bool) -> ServiceSpec[AsyncConnection]:
    """A subscriber of OrderPlaced added in the test: its handler succeeds or always fails."""

    async def handle(event: OrderPlaced, conn: AsyncConnection) -> Sequence[Event]:
        if fail:
            raise RuntimeError("the warehouse API is down")
        return []

    return ServiceSpec(name=name, handlers={OrderPlaced: handle}, store=lambda conn: conn,
                       metadata=MetaData())


async def test_a_stopped_subscriber_makes_orders_pending_then_late_and_doctor_fails(
        start_service: StartService, amqp_url: str, management_url: str, name_prefix: str,
        tmp_path: Path, env: dict[str, str], client_factory: Any) -> None:
    """Logistics stops: a new order waits for it (pending), then it is late (ORDER_LATE_AFTER);
    the summaries, `--wait` and `shop doctor` (exit 1, naming the queue) all say so."""
    await start_service(inventory)
    await start_service(seller)
    settings = settings_for(logistics.settings_class, amqp_url, name_prefix, tmp_path)
    stopped = ServiceRunner(logistics.spec(settings), settings, broker_wait=10)
    await stopped.__aenter__()
    try:
        order = await start_order(start_service, management_url, late_after=2.0)
        await wait_for(lambda: registry(order, SUBSCRIBERS), what="the registry")
        async with serve_app(api_of(order)) as api:
            env = {**env, "SHOP_API_URL": api}

            async def doctor_says(code: int, *needles: str) -> Result | None:
                result = await shop(env, "doctor")
                found = result.exit_code == code and all(n in result.output for n in needles)
                return result if found else None

            # The control: with everyone consuming, the doctor is happy.
            await wait_for(lambda: doctor_says(0), timeout=20, interval=0.5,
                           what="shop doctor to find the system healthy")
            await stopped.stop()
            client = client_factory(order)
            order_id = await place(client)
            first = (await client.get(f"/orders/{order_id}")).json()
            assert statuses(first)["logistics"] == "pending"

            async def late() -> dict[str, Any] | None:
                status: dict[str, Any] = (await client.get(f"/orders/{order_id}")).json()
                return status if statuses(status)["logistics"] == "late" else None

            status = await wait_for(late, timeout=15, what="logistics to be late")
            logistics_status = next(s for s in status["subscribers"] if s["name"] == "logistics")
            assert logistics_status["late"] is True
            assert not status["complete"]
            others = await wait_for(
                lambda: _answered(client, order_id, {"inventory", "seller"}), timeout=15,
                what="inventory and seller to handle it")
            assert statuses(others) == {"inventory": "handled", "logistics": "late",
                                        "seller": "handled"}
            [summary] = [o for o in (await client.get("/orders")).json()
                         if o["order_id"] == order_id]
            assert (summary["late"], summary["handled"]) == (1, 2)
            assert {"name": "logistics", "status": "late"} in summary["subscribers"]
            late_listed = (await client.get("/orders", params={"late": "true"})).json()
            assert [o["order_id"] for o in late_listed] == [order_id]

            waited = await shop(env, "order", "status", order_id, "--wait", "0.2")
            assert waited.exit_code == 1
            assert "logistics (late)" in waited.output

            queue = f"{name_prefix}logistics.order.placed"
            result = await wait_for(
                lambda: doctor_says(1, f"{queue} (logistics) has no consumer"), timeout=30,
                interval=0.5, what="shop doctor to name the queue without consumer")
            assert "✗ no late orders: 1 late order(s)" in result.output
            assert f"{order_id}: logistics" in result.output
            report = (await client.get("/system")).json()
            assert report["late_orders"] == 1
            assert f"logistics: its queue {queue} has no consumer" in " ".join(
                report["problems"])
    finally:
        await stopped.stop()


async def _answered(client: httpx.AsyncClient, order_id: str, names: set[str]
                    ) -> dict[str, Any] | None:
    status: dict[str, Any] = (await client.get(f"/orders/{order_id}")).json()
    done = {n for n, s in statuses(status).items() if s == "handled"}
    return status if names <= done else None


async def test_a_subscriber_whose_handler_always_fails_makes_orders_failed_with_the_reason(
        start_service: StartService, management_url: str, name_prefix: str,
        client_factory: Any) -> None:
    """Retries exhausted: failed, with the exception and the dead-letter queue it waits in;
    `GET /system` counts that dead letter and says where it is."""
    await start_service(probe("brittle", fail=True))
    order = await start_order(start_service, management_url)
    await wait_for(lambda: registry(order, {"brittle"}), what="the registry")
    client = client_factory(order)
    order_id = await place(client)

    async def failed() -> dict[str, Any] | None:
        status: dict[str, Any] = (await client.get(f"/orders/{order_id}")).json()
        return status if statuses(status).get("brittle") == "failed" else None

    status = await wait_for(failed, timeout=15, what="the order to fail in brittle")
    [brittle] = status["subscribers"]
    dlq = f"{name_prefix}brittle.order.placed.dlq"
    assert brittle["error"] == "RuntimeError: the warehouse API is down"
    assert brittle["dead_letter_queue"] == dlq
    assert brittle["late"] is False
    assert status["complete"]

    async def counted() -> dict[str, Any] | None:
        report: dict[str, Any] = (await client.get("/system")).json()
        return report if report["dead_letters"] == 1 else None

    report = await wait_for(counted, timeout=20, interval=0.5,
                            what="GET /system to count the dead letter")
    assert f"1 dead letter(s) waiting in {dlq} (shop dlq list brittle)" in report["problems"]
    assert not report["healthy"]


async def test_a_new_subscriber_is_expected_without_any_configuration(
        start_service: StartService, management_url: str, name_prefix: str,
        client_factory: Any) -> None:
    """A subscriber nobody configured starts: `GET /system` lists it with its consumed queue,
    and the next order expects it and shows its light."""
    order = await start_order(start_service, management_url)
    client = client_factory(order)
    before = (await client.get("/system")).json()
    assert "loyalty" not in [s["name"] for s in before["subscribers"]]
    await start_service(probe("loyalty", fail=False))
    queue = f"{name_prefix}loyalty.order.placed"

    async def listed() -> dict[str, Any] | None:
        report: dict[str, Any] = (await client.get("/system")).json()
        loyalty = [s for s in report["subscribers"] if s["name"] == "loyalty"]
        consumed = loyalty and loyalty[0]["queues"][0]["consumers"] == 1
        return loyalty[0] if consumed else None

    loyalty = await wait_for(listed, timeout=20, interval=0.5,
                             what="loyalty among the subscribers, consumed")
    assert loyalty["consumes"] == {"OrderPlaced": queue}
    assert loyalty["queues"][0]["exists"] is True
    assert loyalty["stale"] is False
    order_id = await place(client)
    status = await wait_for(lambda: _answered(client, order_id, {"loyalty"}), timeout=15,
                            what="loyalty to handle the order")
    assert [(s["name"], s["expected"]) for s in status["subscribers"]] == [("loyalty", True)]
    [summary] = (await client.get("/orders")).json()
    assert summary["subscribers"] == [{"name": "loyalty", "status": "handled"}]


async def test_a_queue_bound_by_hand_is_reported_as_unannounced(
        start_service: StartService, management_url: str, name_prefix: str,
        amqp: aio_pika.abc.AbstractRobustConnection, env: dict[str, str],
        client_factory: Any) -> None:
    """A queue bound to order.placed that no subscriber announced: `GET /system` and
    `shop doctor` both report it, with its exchange."""
    await start_service(inventory)
    order = await start_order(start_service, management_url)
    await wait_for(lambda: registry(order, {"inventory"}), what="the registry")
    client = client_factory(order)
    exchange = f"{name_prefix}order.placed"
    sneaky = f"{name_prefix}sneaky.copy"
    control = (await client.get("/system")).json()
    assert control["unannounced_queues"] == []
    assert control["bindings_known"] is True

    channel = await amqp.channel()
    queue = await channel.declare_queue(sneaky, durable=True)
    await queue.bind(exchange)  # nothing announced it: the registry does not know it

    async def reported() -> dict[str, Any] | None:
        report: dict[str, Any] = (await client.get("/system")).json()
        return report if report["unannounced_queues"] else None

    # The management API lists a new binding after its next stats refresh: seconds, more
    # on a busy machine.
    report = await wait_for(reported, timeout=30, what="the unannounced queue")
    assert report["unannounced_queues"] == [{"queue": sneaky, "exchange": exchange}]
    assert any(p.startswith(f"{sneaky} is bound to {exchange}") for p in report["problems"])
    async with serve_app(api_of(order)) as api:
        result = await shop({**env, "SHOP_API_URL": api}, "doctor", "--json")
    assert result.exit_code == 1, result.output
    diagnosis = json.loads(result.stdout)
    [check] = [c for c in diagnosis["checks"] if c["name"] == "no unannounced queue"]
    assert check["status"] == "failed"
    assert check["items"] == [f"{sneaky} on {exchange}"]


async def test_doctor_without_the_order_api_fails_that_check_and_still_checks_the_broker(
        env: dict[str, str]) -> None:
    """No order API: that check fails (exit 1); the broker is still checked; what needs the
    registry is marked unknown."""
    result = await shop({**env, "SHOP_API_URL": "http://127.0.0.1:9"}, "doctor", "--json")
    assert result.exit_code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["order API answers"]["status"] == "failed"
    assert "cannot reach the order API" in checks["order API answers"]["detail"]
    assert checks["broker reachable (AMQP)"]["status"] == "ok"
    assert checks["no stale subscriber"]["status"] == "unknown"
    # Nothing runs under this prefix: the built-in services' queues are missing.
    consumed = checks["every expected queue has a consumer"]
    assert consumed["status"] == "failed"
    assert "registry unknown" in consumed["detail"]


# --- shop queues, the trace -------------------------------------------------------------

async def start_system(start_service: StartService, management_url: str) -> Runtime[Any]:
    await start_service(inventory)
    await start_service(logistics)
    await start_service(seller)
    order = await start_order(start_service, management_url)
    await wait_for(lambda: registry(order, SUBSCRIBERS), what="the registry")
    return order


async def test_shop_queues_reports_rates_once_and_live(
        start_service: StartService, management_url: str, name_prefix: str,
        env: dict[str, str], client_factory: Any, tmp_path: Path) -> None:
    """After an order, `shop queues --json` has publish and deliver rates; `--watch --json`
    prints one JSON object per refresh and leaves with status 0 on Ctrl-C; `--svg` saves
    the view."""
    order = await start_system(start_service, management_url)
    client = client_factory(order)
    order_id = await place(client)
    await wait_for(lambda: _answered(client, order_id, SUBSCRIBERS), timeout=15,
                   what="the order to be handled")
    queue = f"{name_prefix}inventory.order.placed"
    picture = tmp_path / "queues.svg"

    async def with_rates() -> dict[str, Any] | None:
        result = await shop(env, "queues", "--json", "--svg", str(picture))
        assert result.exit_code == 0, result.output
        listing: dict[str, Any] = json.loads(result.stdout)
        [row] = [r for r in listing["queues"] if r["queue"] == queue]
        return listing if row["publish_rate"] is not None else None

    listing = await wait_for(with_rates, timeout=20, interval=0.5,
                             what="the management API's rates for the queue")
    assert listing["source"] == "management API"
    assert all({"publish_rate", "deliver_rate", "dead_letters", "consumers"} <= set(r)
               for r in listing["queues"])
    assert queue in picture.read_text()

    frames = await asyncio.to_thread(_watch_two_frames, env)
    for frame in frames:
        [row] = [r for r in frame["queues"] if r["queue"] == queue]
        assert {"publish_rate", "deliver_rate", "growing"} <= set(row)
        assert row["consumers"] == 1, json.dumps(frame)


def _watch_two_frames(env: dict[str, str]) -> list[dict[str, Any]]:
    """`shop queues --watch --json` as a process: two lines read, then Ctrl-C (SIGINT)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.ops.cli", "queues", "--watch", "--json", "--interval",
         "0.3"], env={**os.environ, **env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return [json.loads(line) for line in lines]


async def test_an_orders_trace_lists_its_steps_in_time_order(
        start_service: StartService, management_url: str, env: dict[str, str],
        client_factory: Any) -> None:
    """Placed, published, the three subscribers' receipts and the outcomes with their
    producers, in time order; `shop order trace` prints the same."""
    order = await start_system(start_service, management_url)
    client = client_factory(order)
    order_id = await place(client)

    async def traced() -> dict[str, Any] | None:
        found: dict[str, Any] = (await client.get(f"/orders/{order_id}/trace")).json()
        outcomes = {s["outcome"] for s in found["steps"] if s["kind"] == "outcome"}
        # Receipts travel on the audit queue, apart from the outcomes: wait for both.
        receipts = {s["service"] for s in found["steps"] if s["kind"] == "receipt"
                    and s["what"].startswith("OrderPlaced")}
        done = outcomes >= {"stock_reserved", "shipment", "seller"} and receipts >= SUBSCRIBERS
        return found if done else None

    found = await wait_for(traced, timeout=15, what="the outcomes and receipts in the trace")
    steps = found["steps"]
    assert [s["kind"] for s in steps[:2]] == ["placed", "published"]
    assert steps[0]["since_placed_ms"] == 0
    placed_receipts = {s["service"]: s for s in steps if s["kind"] == "receipt"
                       and s["what"].startswith("OrderPlaced")}
    assert set(placed_receipts) == SUBSCRIBERS
    assert all(r["outcome"] == "handled" and r["duration_ms"] is not None
               for r in placed_receipts.values())
    producers = {s["outcome"]: s["service"] for s in steps if s["kind"] == "outcome"}
    assert producers == {"stock_reserved": "inventory", "shipment": "logistics",
                         "seller": "seller"}
    times = [datetime.fromisoformat(s["at"]) for s in steps]
    assert times == sorted(times)
    assert [s["since_placed_ms"] for s in steps] == sorted(s["since_placed_ms"] for s in steps)
    assert (await client.get(f"/orders/{uuid.uuid4()}/trace")).status_code == 404

    async with serve_app(api_of(order)) as api:
        result = await shop({**env, "SHOP_API_URL": api}, "order", "trace", order_id)
    assert result.exit_code == 0, result.output
    for needle in ("placed", "published", "inventory", "logistics", "seller",
                   "StockReserved: reserved 1 line(s)"):
        assert needle in result.output


async def test_without_the_management_api_passive_declares_stand_in(
        start_service: StartService, name_prefix: str, env: dict[str, str],
        client_factory: Any) -> None:
    """The management API away: `GET /system` and `shop queues` say so and read counts and
    consumers by AMQP passive declares (no unacked, no rates, no bindings)."""
    away = "http://guest:guest@127.0.0.1:9/"
    await start_service(inventory)
    order = await start_order(start_service, away)
    await wait_for(lambda: registry(order, {"inventory"}), what="the registry")
    client = client_factory(order)
    report = (await client.get("/system")).json()
    assert report["broker"]["source"] == "amqp"
    assert "management API at http://guest:***@127.0.0.1:9/ not reachable" in (
        report["broker"]["error"])
    assert report["bindings_known"] is False
    [subscriber] = [s for s in report["subscribers"] if s["name"] == "inventory"]
    assert subscriber["queues"] == [{"queue": f"{name_prefix}inventory.order.placed",
                                     "exists": True, "consumers": 1, "ready": 0,
                                     "unacked": None, "dead_letters": 0}]

    result = await shop({**env, "RABBITMQ_MANAGEMENT_URL": away}, "queues", "--json")
    assert result.exit_code == 0, result.output
    assert "using AMQP passive declares" in result.stderr
    listing = json.loads(result.stdout)
    assert listing["source"] == "amqp"
    [row] = [r for r in listing["queues"] if r["queue"] == f"{name_prefix}inventory.order.placed"]
    assert (row["consumers"], row["unacked"], row["publish_rate"]) == (1, None, None)


async def test_a_current_read_asks_the_broker_for_counts_the_statistics_have_not_caught(
        amqp_url: str, management_url: str, name_prefix: str) -> None:
    """The management API's consumer counts are as of its last statistics refresh (5 s):
    with `current` (as `shop doctor` reads) a consumer that just started, then just
    stopped, shows at once."""
    settings = ServiceSettings(amqp_url=amqp_url, management_url=management_url,
                               name_prefix=name_prefix)
    name = f"{name_prefix}probe.order.placed"
    api = observe.ManagementApi.of(settings)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=True)

        async def counted_by_the_api() -> bool:
            async with api.client() as client:
                snapshot = await observe.read_management(client, api, name_prefix, ())
            found = snapshot.queues.get(name)
            return found is not None and found.consumers == 0

        await wait_for(counted_by_the_api, timeout=30, interval=0.5,
                       what="the management API's statistics of the new queue")

        async def ack(message: AbstractIncomingMessage) -> None:
            await message.ack()

        tag = await queue.consume(ack)
        started = await observe.read_broker(settings, [name], connection=connection,
                                            current=True)
        await queue.cancel(tag)
        stopped = await observe.read_broker(settings, [name], connection=connection,
                                            current=True)
        assert (started.source, stopped.source) == (observe.MANAGEMENT, observe.MANAGEMENT)
        assert started.queues[name].consumers == 1
        assert stopped.queues[name].consumers == 0
    finally:
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            await cleanup.queue_delete(name)
        await connection.close()
