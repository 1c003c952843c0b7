"""The whole system as a user runs it: `shop up`, orders from the CLI and over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

from common.ops.observe import sweep_prefix
from tests.e2e.support import SUBSCRIBERS, System, poll, run_system

pytestmark = pytest.mark.e2e

ADDRESS = ["--name", "Ada Lovelace", "--street", "12 Analytical Row", "--city", "Berlin",
           "--postal-code", "10115", "--country", "DE"]
@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, amqp_url: str,
           management_url: str) -> Iterator[System]:
    with run_system(tmp_path_factory.mktemp("system"), amqp_url, management_url) as system:
        yield system


def place_with_cli(system: System, *items: str) -> str:
    args = ["order", "place", "--customer", "cust-e2e"]
    for item in items:
        args += ["--item", item]
    result = system.shop(*args, *ADDRESS)
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout.strip().splitlines()[-1]


def test_an_order_from_the_cli_is_handled_by_every_subscriber(system: System) -> None:
    """`shop order place` then `shop order status --wait`: all three subscribers handled it."""
    order_id = place_with_cli(system, "SKU-BOOK-1:2:12.50:seller-books",
                              "SKU-MUG-1:1:8.00:seller-home")
    result = system.shop("order", "status", order_id, "--wait", "30", "--json")
    assert result.returncode == 0, result.stderr + result.stdout + system.logs()
    status = json.loads(result.stdout)
    outcomes = {s["name"]: s["status"] for s in status["subscribers"]}
    assert {name: outcomes.get(name) for name in SUBSCRIBERS} == dict.fromkeys(SUBSCRIBERS,
                                                                               "handled")
    assert status["state"] == "confirmed"

    inbox = system.shop("seller", "inbox", "seller-home", "--json")
    assert inbox.returncode == 0, inbox.stderr
    assert order_id in inbox.stdout


def test_an_order_over_http_is_handled_and_listed(system: System) -> None:
    """POST /orders answers 202 with a status URL that ends with every subscriber handled."""
    body = {
        "customer_id": "cust-http",
        "currency": "EUR",
        "lines": [{"sku": "SKU-BOOK-1", "quantity": 1, "unit_price": "12.50",
                   "seller_id": "seller-books"}],
        "total": "12.50",
        "shipping_address": {"name": "Grace Hopper", "street": "1 Compiler Way",
                             "city": "Paris", "postal_code": "75001", "country": "FR"},
    }
    response = httpx.post(f"{system.api}/orders", json=body, timeout=10)
    assert response.status_code == 202, response.text
    order_id = response.json()["order_id"]
    status_url = system.api + response.json()["status_url"]

    def complete() -> dict[str, Any] | None:
        status: dict[str, Any] = httpx.get(status_url, timeout=5).json()
        done = {s["name"] for s in status["subscribers"] if s["status"] == "handled"}
        # A receipt and the outcome event travel on different queues: inventory's receipt
        # may be in before its StockReserved moves the order on, so wait for both.
        return status if done >= SUBSCRIBERS and status["state"] != "placed" else None

    status = poll(complete, timeout=30, what="every subscriber to handle the HTTP order")
    assert status["state"] == "confirmed"
    listed = httpx.get(f"{system.api}/orders", timeout=5).json()
    assert order_id in json.dumps(listed)


def test_an_order_for_more_stock_than_exists_fails_reservation(system: System) -> None:
    """Ordering more than the stock holds ends in StockReservationFailed, reserving nothing."""
    set_stock = system.shop("inventory", "stock", "set", "SKU-E2E-RARE", "1")
    assert set_stock.returncode == 0, set_stock.stderr
    order_id = place_with_cli(system, "SKU-E2E-RARE:5:3.00:seller-rare",
                              "SKU-BOOK-1:1:12.50:seller-books")
    result = system.shop("order", "status", order_id, "--wait", "30", "--json")
    assert result.returncode == 0, result.stderr + result.stdout
    status = json.loads(result.stdout)
    assert status["state"] == "rejected"
    assert "SKU-E2E-RARE" in json.dumps(status["outcomes"])
    stock = system.shop("inventory", "stock", "list", "--json")
    rare = [row for row in json.loads(stock.stdout) if row["sku"] == "SKU-E2E-RARE"]
    assert rare
    assert rare[0]["available"] == 1


def test_queues_show_no_backlog_afterwards(system: System) -> None:
    """After the orders above, `shop queues` shows every queue drained and consumed."""
    order_id = place_with_cli(system, "SKU-MUG-1:1:8.00:seller-home")
    assert system.shop("order", "status", order_id, "--wait", "30").returncode == 0

    def drained() -> list[dict[str, Any]] | None:
        result = system.shop("queues", "--json")
        assert result.returncode == 0, result.stderr
        rows: list[dict[str, Any]] = json.loads(result.stdout)["queues"]
        mine = [r for r in rows if r["queue"].startswith(system.env["SHOP_NAME_PREFIX"])]
        busy = [r for r in mine if r["ready"] or r["unacked"] or not r["consumers"]]
        return mine if mine and not busy else None

    rows = poll(drained, timeout=30, what="every queue to drain")
    names = {r["queue"] for r in rows}
    prefix = system.env["SHOP_NAME_PREFIX"]
    assert {f"{prefix}inventory.order.placed", f"{prefix}logistics.order.placed",
            f"{prefix}seller.order.placed"} <= names
    assert all(r["dead_letters"] == 0 for r in rows)


def test_bad_cli_input_is_refused_and_nothing_is_placed(system: System) -> None:
    """A malformed --item or an unknown service is refused with a message; no order appears."""
    before = httpx.get(f"{system.api}/orders", timeout=5).json()
    for item in ("SKU-1:2:1.00", "SKU-1:0:1.00:s", "SKU-1:-1:1.00:s", "SKU-1:x:1.00:s"):
        result = system.shop("order", "place", "--customer", "c", "--item", item, *ADDRESS)
        assert result.returncode != 0
        assert "item" in (result.stderr + result.stdout).lower()
    unknown = system.shop("run", "payments")
    assert unknown.returncode != 0
    assert "payments" in unknown.stderr
    assert httpx.get(f"{system.api}/orders", timeout=5).json() == before


def test_a_queue_declared_differently_stops_the_service_with_a_clear_message(
        amqp_url: str, management_url: str, tmp_path: Path) -> None:
    """A clash with the broker's queue (PRECONDITION_FAILED) exits non-zero, naming the queue."""
    prefix = f"clash{os.getpid()}."
    queue = f"{prefix}seller.order.placed"

    async def declare() -> None:
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments={"x-max-length": 5})
        await connection.close()

    asyncio.run(declare())
    try:
        env = {**os.environ, "AMQP_URL": amqp_url, "SHOP_NAME_PREFIX": prefix,
               "SHOP_DATA_DIR": str(tmp_path), "LOG_FORMAT": "json"}
        result = subprocess.run([sys.executable, "-m", "seller_service"], env=env,
                                capture_output=True, text=True, timeout=60, check=False)
    finally:
        sweep_prefix(management_url, prefix)
    assert result.returncode != 0
    assert repr(queue) in result.stderr
    assert "To migrate" in result.stderr
    assert "Traceback" not in result.stderr
