"""The fault suite's harness: a throwaway RabbitMQ node, the services as processes, the ledger.

The node (scripts/rabbitmq-node) is ours to stop, restart and starve of memory; the
machine's main broker is never touched. Each test runs the four real services and the
test-only probe subscriber (probe_service.py) as separate processes under its own name
prefix and data folder, places orders over HTTP, breaks something, and then reads every
subscriber's database directly to draw up the ledger: every accepted order must have
exactly one effect in each subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import aio_pika
import httpx

from bench.node import NodeAddress, NodeError, destroy_node, rabbitmqctl, start_node
from common.kit.db import create_tables, make_engine
from common.kit.outbox import kit_metadata
from inventory_service.store import StockStore
from inventory_service.store import metadata as inventory_metadata
from order_service.cli.placing import PLACE_ATTEMPTS

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
SUBSCRIBERS = ("inventory", "logistics", "seller")
SERVICES = ("order", *SUBSCRIBERS)
#: The services and the probe: a subscriber whose effects have no unique key, so that a
#: delivery handled twice shows as a second effect (the real services' unique keys would
#: roll the second one back).
SYSTEM = (*SERVICES, "probe")
#: How each service is started; the probe is the test-only subscriber that fails on demand.
MODULES = {"order": "order_service", "inventory": "inventory_service",
           "logistics": "logistics_service", "seller": "seller_service",
           "probe": "tests.faults.probe_service"}
#: Every order of the suite: two lines (a reservation each) from one seller (one
#: notification). One seller rather than two keeps the order service's work per order down
#: (one SellerNotified and its receipt less), which is what bounds the suite's throughput.
LINES = (("SKU-FAULT-A", "seller-fa", "4.50"), ("SKU-FAULT-B", "seller-fa", "7.25"))
STOCK = 10_000_000  # far more than any test orders: every reservation succeeds
#: Seconds a service gets to exit on SIGTERM: its in-flight handlers get 5
#: (SHOP_SHUTDOWN_TIMEOUT below), its outbox flush 5 more.
STOP_TIMEOUT = 15.0
#: The node's memory watermark as scripts/rabbitmq-node configures it, restored after alarms.
DEFAULT_WATERMARK = 0.4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def node_port() -> int:
    """An AMQP port for the throwaway node whose management (+10000) and distribution
    (+20000) ports are free too."""
    start = 5700 + os.getpid() % 200
    for port in range(start, start + 400):
        if port != 5672 and all(port_free(p) for p in (port, port + 10000, port + 20000)):
            return port
    raise NodeError("no free port triple (P, P+10000, P+20000) from 5700 up")


async def wait_for(probe: Callable[[], Awaitable[T | None]], *, timeout: float, what: str,
                   interval: float = 0.2) -> T:
    """Await `probe` until it returns something truthy, or fail after `timeout` seconds
    saying what was awaited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        last = await probe()
        if last:
            return last
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                 f"last: {str(last)[:500]}")
        await asyncio.sleep(interval)  # polling interval under a deadline, not a fixed wait


async def wait_until(condition: Callable[[], T | None], *, timeout: float, what: str,
                     interval: float = 0.2) -> T:
    """wait_for with a plain function: a file, a process, a database read."""

    async def probe() -> T | None:
        return condition()

    return await wait_for(probe, timeout=timeout, what=what, interval=interval)


# --- the throwaway node ------------------------------------------------------------------


@dataclass
class Node(NodeAddress):
    """The throwaway RabbitMQ node and the faults the tests inflict on it."""

    #: Set while the test has the app stopped or the watermark lowered: restore() undoes it.
    app_stopped: bool = False
    watermark_lowered: bool = False

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port + 10000}/api"

    # --- lifecycle (scripts/rabbitmq-node) ---

    def start(self) -> None:
        start_node(self)

    def destroy(self) -> None:
        destroy_node(self)

    # --- faults (rabbitmqctl -n NODE ...) ---

    def ctl(self, *args: str, timeout: float = 120) -> str:
        return rabbitmqctl(self, *args, timeout=timeout)

    async def actl(self, *args: str) -> str:
        return await asyncio.to_thread(self.ctl, *args)

    async def stop_app(self) -> None:
        self.app_stopped = True
        await self.actl("stop_app")

    async def start_app(self) -> None:
        await self.actl("start_app")
        await self.actl("await_startup")
        self.app_stopped = False

    async def restart(self) -> None:
        await self.stop_app()
        await self.start_app()

    async def close_all_connections(self, reason: str = "fault suite") -> None:
        await self.actl("close_all_connections", reason)

    async def set_vm_memory_high_watermark(self, fraction: float) -> None:
        self.watermark_lowered = fraction != DEFAULT_WATERMARK
        await self.actl("set_vm_memory_high_watermark", f"{fraction:.10f}")

    async def memory_alarm(self) -> bool:
        """Whether the node has raised its memory alarm (publishing blocked)."""
        async with httpx.AsyncClient(auth=("guest", "guest"), timeout=5) as client:
            response = await client.get(f"{self.api}/nodes/{quote(self.node)}",
                                        params={"columns": "mem_alarm"})
            response.raise_for_status()
            return bool(response.json().get("mem_alarm"))

    def restore(self) -> None:
        """Undo whatever a test left broken: the app running, the watermark back."""
        if self.app_stopped:
            self.ctl("start_app")
            self.ctl("await_startup")
            self.app_stopped = False
        if self.watermark_lowered:
            self.ctl("set_vm_memory_high_watermark", str(DEFAULT_WATERMARK))
            self.watermark_lowered = False

    # --- looking at queues ---

    async def redelivered(self, prefix: str) -> int | None:
        """Messages the broker redelivered on the queues under `prefix`, or None when the
        management API does not answer."""
        try:
            queues = await self.queue_stats(prefix)
        except httpx.HTTPError:
            return None
        return sum(int((q.get("message_stats") or {}).get("redeliver", 0))
                   for q in queues.values())

    async def queue_stats(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Consumers, ready and unacked messages of every queue under `prefix`, from the
        management API (counts refresh every second on this node)."""
        async with httpx.AsyncClient(auth=("guest", "guest"), timeout=5) as client:
            response = await client.get(
                f"{self.api}/queues/%2F",
                params={"columns": "name,consumers,messages_ready,messages_unacknowledged,"
                                   "message_stats"})
            response.raise_for_status()
        return {q["name"]: q for q in response.json() if q["name"].startswith(prefix)}

    async def declared(self, queues: Iterable[str]) -> dict[str, tuple[int, int]]:
        """(messages ready, consumers) of each queue, from passive declares: live values,
        not the management API's periodic statistics."""
        connection = await aio_pika.connect(self.amqp_url, timeout=5)
        try:
            counts = {}
            for name in queues:
                channel = await connection.channel()
                declared = await channel.declare_queue(name, passive=True)
                result = declared.declaration_result
                counts[name] = (int(result.message_count or 0), int(result.consumer_count or 0))
                await channel.close()
            return counts
        finally:
            await connection.close()


# --- the services as processes -----------------------------------------------------------


def new_order(customer: str = "cust-fault") -> dict[str, Any]:
    """The body of POST /orders for one order of the suite's two lines."""
    lines = [{"sku": sku, "quantity": 1, "unit_price": price, "seller_id": seller}
             for sku, seller, price in LINES]
    return {
        "customer_id": customer,
        "currency": "EUR",
        "lines": lines,
        "total": str(sum(Decimal(price) for _, _, price in LINES)),
        "shipping_address": {"name": "Ada Lovelace", "street": "12 Analytical Row",
                             "city": "Berlin", "postal_code": "10115", "country": "DE"},
    }


@dataclass
class Placement:
    """What happened to the orders a test sent over HTTP."""

    sent: int = 0
    accepted: list[uuid.UUID] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)


class Shop:
    """The system under test: each service a process with its own log and database."""

    def __init__(self, node: Node, tmp: Path, prefix: str) -> None:
        self.node = node
        self.tmp = tmp
        self.prefix = prefix
        self.data = tmp / "data"
        self.logs = tmp / "logs"
        self.data.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "AMQP_URL": node.amqp_url,
            "RABBITMQ_MANAGEMENT_URL": node.management_url,
            "SHOP_NAME_PREFIX": prefix,
            "SHOP_DATA_DIR": str(self.data),
            "SHOP_RETRY_DELAYS": "0.2,0.5",
            "SHOP_CONSUMER_CHECK_INTERVAL": "1",
            "SHOP_SHUTDOWN_TIMEOUT": "5",
            "ORDER_HTTP_PORT": str(self.port),
            "SHOP_API_URL": self.api,
            "INVENTORY_SEED_CATALOGUE": "false",
            # No /metrics servers: their fixed default ports would clash between runs.
            **{f"{service.upper()}_METRICS_PORT": "0" for service in MODULES},
            # Each its SQLite file here, whatever database the caller's environment names:
            # the ledger reads these files.
            **{f"{service.upper()}_DATABASE_URL": f"sqlite+aiosqlite:///{self.db(service)}"
               for service in MODULES},
            "PROBE_MARKER_DIR": str(tmp / "probe-markers"),
            "PROBE_ATTEMPTS_FILE": str(tmp / "probe-attempts.jsonl"),
            "PROBE_BROKEN_FLAG": str(tmp / "probe-broken"),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
        #: Services that had to be killed because SIGTERM did not stop them in time.
        self.unstopped: list[str] = []
        #: Per service, environment variables that differ from `env`.
        self.service_env: dict[str, dict[str, str]] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.placement = Placement()

    # --- processes ---

    def db(self, service: str) -> Path:
        return self.data / f"{service}.db"

    def queue(self, service: str) -> str:
        return f"{self.prefix}{service}.order.placed"

    def start(self, service: str) -> None:
        """Start one service as `python -m <module>`, with the shop's environment and its
        own overrides (`service_env`); its output goes to logs/<service>.log."""
        assert service not in self.procs or self.procs[service].poll() is not None, \
            f"{service} already runs"
        with (self.logs / f"{service}.log").open("ab") as out:
            self.procs[service] = subprocess.Popen(
                [sys.executable, "-m", MODULES[service]], cwd=ROOT,
                env={**self.env, **self.service_env.get(service, {})},
                stdout=out, stderr=subprocess.STDOUT)

    def stop(self, service: str, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then wait for the exit; SIGKILL after `timeout` seconds, noted in
        `unstopped` (reported with the ledger; test_shutdown.py covers that fault)."""
        proc = self.procs[service]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.unstopped.append(service)
        return int(proc.returncode)

    def kill(self, service: str) -> None:
        proc = self.procs[service]
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=30)

    def restart(self, service: str) -> None:
        self.stop(service)
        self.start(service)

    def running(self, service: str) -> bool:
        return service in self.procs and self.procs[service].poll() is None

    def shutdown(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every process still running: SIGTERM, then SIGKILL after `timeout` seconds
        (noted in `unstopped`)."""
        for service in list(self.procs):
            if self.running(service):
                self.procs[service].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.unstopped.append(service)

    def log_tail(self, service: str, lines: int = 25) -> str:
        path = self.logs / f"{service}.log"
        if not path.exists():
            return f"(no log for {service})"
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last lines of {service}'s log ---\n" + "\n".join(tail)

    def log_records(self, service: str) -> list[dict[str, Any]]:
        """The service's JSON log lines, parsed (other lines, if any, skipped)."""
        path = self.logs / f"{service}.log"
        records = []
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def all_logs(self) -> str:
        return "\n".join(self.log_tail(s) for s in self.procs)

    def check_alive(self, *services: str) -> None:
        for service in services or tuple(self.procs):
            proc = self.procs.get(service)
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{service} exited (code {proc.returncode}) unexpectedly"
                                     f"\n{self.log_tail(service)}")

    async def seed_stock(self) -> None:
        """Enough stock for every order the suite places, before inventory starts."""
        engine = make_engine(f"sqlite+aiosqlite:///{self.db('inventory')}")
        try:
            await create_tables(engine, kit_metadata, inventory_metadata)
            async with engine.begin() as conn:
                for sku, _seller, _price in LINES:
                    await StockStore(conn).set_stock(sku, STOCK)
        finally:
            await engine.dispose()

    async def up(self, *services: str, timeout: float = 60) -> None:
        """Start `services` and wait until they are ready: the API answers healthy, each
        subscriber consumes its queue."""
        for service in services:
            self.start(service)
        await self.ready(*services, timeout=timeout)

    async def ready(self, *services: str, timeout: float = 60) -> None:
        subscribers = [s for s in services if s != "order"]

        async def check() -> bool:
            self.check_alive(*services)
            if "order" in services and not await self.healthy():
                return False
            if subscribers:
                try:
                    counts = await self.node.declared(self.queue(s) for s in subscribers)
                except Exception:  # not declared yet, or the broker is away: not ready
                    return False
                return all(consumers > 0 for _ready, consumers in counts.values())
            return True

        await wait_for(check, timeout=timeout, what=f"{', '.join(services)} to be ready")

    async def health(self) -> tuple[int, bool | None]:
        """GET /healthz: the status code and what it says of the broker."""
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{self.api}/healthz")
        return response.status_code, response.json().get("broker")

    async def healthy(self) -> bool:
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                return (await client.get(f"{self.api}/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    # --- orders ---

    async def place(self, count: int, *, customer: str = "cust-fault", concurrency: int = 16,
                    timeout: float = 300) -> list[uuid.UUID]:
        """POST `count` orders, `concurrency` at a time; returns the accepted ids (202)."""
        accepted: list[uuid.UUID] = []
        body = new_order(customer)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(count):
            queue.put_nowait(n)

        async def worker(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                queue.get_nowait()
                self.placement.sent += 1
                try:
                    response = await self._post_once(client, body)
                except httpx.HTTPError as exc:
                    self.placement.refused[type(exc).__name__] += 1
                    continue
                if response.status_code == 202:
                    accepted.append(uuid.UUID(response.json()["order_id"]))
                else:
                    self.placement.refused[str(response.status_code)] += 1

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            await asyncio.wait_for(
                asyncio.gather(*(worker(client) for _ in range(concurrency))), timeout)
        self.placement.accepted += accepted
        return accepted

    async def _post_once(self, client: httpx.AsyncClient, body: dict[str, Any]
                         ) -> httpx.Response:
        """POST one order as a careful client does: with an Idempotency-Key, sent again
        with it when the connection fails before the answer (the API places it once)."""
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        for _ in range(PLACE_ATTEMPTS - 1):
            try:
                return await client.post(f"{self.api}/orders", json=body, headers=headers)
            except httpx.TransportError:
                continue
        return await client.post(f"{self.api}/orders", json=body, headers=headers)

    async def publish_raw(self, exchange: str, messages: Sequence[aio_pika.Message]) -> None:
        """Publish messages as they are to one of the system's exchanges, confirmed."""
        connection = await aio_pika.connect(self.node.amqp_url, timeout=10)
        try:
            channel = await connection.channel(publisher_confirms=True)
            target = await channel.get_exchange(f"{self.prefix}{exchange}", ensure=True)
            for message in messages:
                await target.publish(message, routing_key="", mandatory=True)
        finally:
            await connection.close()

    def order_event(self, order_id: uuid.UUID) -> tuple[str, str]:
        """The OrderPlaced of an accepted order as the order service stored it: its body
        (what the relay published) and its event id."""
        rows = _rows(self.db("order"), "SELECT body, event_id FROM orders WHERE order_id = ?",
                     (str(order_id),))
        assert rows, f"order {order_id} is not in the order service's database"
        return str(rows[0][0]), str(rows[0][1])

    def receipts(self, event_id: str) -> set[tuple[str, str]]:
        """(subscriber, outcome) of every receipt the order service holds for an event."""
        return {(str(s), str(o)) for s, o in _rows(
            self.db("order"), "SELECT subscriber, outcome FROM deliveries WHERE event_id = ?",
            (event_id,))}

    def probe_calls(self, order_id: uuid.UUID) -> list[float]:
        """When the probe's handler was called for an order (its attempt log), in order."""
        path = Path(self.env["PROBE_ATTEMPTS_FILE"])
        if not path.exists():
            return []
        calls = [json.loads(line) for line in path.read_text().splitlines() if line]
        return sorted(c["at"] for c in calls if c["order_id"] == str(order_id))

    @property
    def probe_broken_flag(self) -> Path:
        return Path(self.env["PROBE_BROKEN_FLAG"])

    async def shop_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`shop ARGS` as a user runs it, with the system's environment."""
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "common.ops.cli", *args], cwd=ROOT,
            env={**self.env, "COLUMNS": "250"}, capture_output=True, text=True, timeout=120,
            check=False)

    async def dead_letters(self, queue: str, count: int) -> list[dict[str, Any]]:
        """Up to `count` messages of a dead-letter queue, left in place (management API)."""
        async with httpx.AsyncClient(auth=("guest", "guest"), timeout=10) as client:
            response = await client.post(
                f"{self.node.api}/queues/%2F/{quote(queue, safe='')}/get",
                json={"count": count, "ackmode": "ack_requeue_true", "encoding": "auto"})
            response.raise_for_status()
            return list(response.json())

    # --- the ledger ---

    @property
    def subscribers(self) -> tuple[str, ...]:
        """The subscribers this test started (the ledger checks each of them)."""
        return tuple(s for s in self.procs if s != "order")

    def ledger(self, subscribers: Sequence[str] | None = None) -> Ledger:
        return read_ledger(self.data, self.subscribers if subscribers is None else subscribers)

    def assert_clean(self, accepted: int) -> None:
        """The ledger every test ends on: `accepted` orders, none lost, none twice."""
        ledger = self.ledger()
        assert ledger.accepted == accepted, ledger.brief()
        assert ledger.lost == 0, ledger.brief()
        assert ledger.duplicates == 0, ledger.duplicate_examples
        assert ledger.unexpected == 0, ledger.brief()

    async def delivered(self, *, timeout: float) -> float:
        """Wait until every accepted order has its effect in each subscriber; returns the
        seconds it took."""
        expected = len(self.placement.accepted)
        started = time.monotonic()

        def complete() -> Ledger | None:
            self.check_alive()
            ledger = self.ledger()
            return ledger if ledger.accepted >= expected and ledger.lost == 0 else None

        await wait_until(complete, timeout=timeout, interval=0.5,
                         what=f"{expected} orders to reach {', '.join(self.subscribers)} "
                              f"(ledger: {self.ledger().brief()})")
        return time.monotonic() - started

    async def settled(self, *, timeout: float = 120) -> Ledger:
        """Wait until the receipts have caught up: every outbox published and the order
        service holding a `handled` receipt from each subscriber for each order."""

        def caught_up() -> Ledger | None:
            self.check_alive()
            ledger = self.ledger()
            unsent = sum(unsent_rows(self.db(s)) for s in ("order", *self.subscribers))
            want = ledger.accepted * len(self.subscribers)
            return ledger if unsent == 0 and ledger.handled_receipts >= want else None

        return await wait_until(caught_up, timeout=timeout, interval=0.5,
                                what="every receipt to reach the order service "
                                     f"(ledger: {self.ledger().brief()})")


# --- the ledger ----------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every accepted order against every subscriber's effects, read from their databases."""

    accepted: int
    #: Accepted orders missing an effect in at least one subscriber.
    lost: int
    #: Effects beyond the first for the same (subscriber, order, SKU or seller).
    duplicates: int
    #: Effects for orders the order service never accepted.
    unexpected: int
    #: Receipts saying a delivery came again: `duplicate` (no second effect) or `retried`.
    redeliveries: int
    #: `handled` receipts the order service holds, one per (order, subscriber) at most.
    handled_receipts: int
    #: Receipts by outcome, across subscribers.
    outcomes: dict[str, int]
    lost_examples: list[str] = field(default_factory=list)
    duplicate_examples: list[str] = field(default_factory=list)

    def brief(self) -> str:
        return (f"accepted={self.accepted} lost={self.lost} duplicates={self.duplicates} "
                f"unexpected={self.unexpected} redeliveries={self.redeliveries} "
                f"receipts={self.outcomes} lost e.g. {self.lost_examples[:3]}")


def _rows(path: Path, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows from a service's SQLite database, read-only; none when it does not exist yet."""
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                            timeout=30)) as conn:
        try:
            return list(conn.execute(query, params))
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise


def _uuid(value: Any) -> str:
    """Order ids as one spelling (sa.Uuid stores 32 hex digits on SQLite)."""
    return str(uuid.UUID(str(value)))


def unsent_rows(path: Path) -> int:
    rows = _rows(path, "SELECT count(*) FROM kit_outbox WHERE sent_at IS NULL")
    return int(rows[0][0]) if rows else 0


#: Per subscriber: how to read its effects, each as the key it must occur under exactly once.
EFFECTS: Mapping[str, str] = {
    "inventory": "SELECT order_id, sku FROM reservations",
    "logistics": "SELECT order_id, '' FROM shipments",
    "seller": "SELECT order_id, seller_id FROM notifications",
    "probe": "SELECT order_id, '' FROM probe_effects",
}


def expected_keys(subscriber: str, order: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The effects `subscriber` owes one order (from its OrderPlaced body)."""
    order_id = _uuid(order["order_id"])
    if subscriber == "inventory":
        return {(order_id, line["sku"]) for line in order["lines"]}
    if subscriber == "seller":
        return {(order_id, line["seller_id"]) for line in order["lines"]}
    return {(order_id, "")}


def read_ledger(data: Path, subscribers: Sequence[str] = SUBSCRIBERS) -> Ledger:
    """Read the order service's accepted orders and each subscriber's effects."""
    orders = [json.loads(body) for (body,) in _rows(data / "order.db",
                                                    "SELECT body FROM orders")]
    accepted_ids = {_uuid(o["order_id"]) for o in orders}
    missing: set[str] = set()
    duplicates = unexpected = 0
    duplicate_examples: list[str] = []
    for subscriber in subscribers:
        effects = Counter((_uuid(order_id), key)
                          for order_id, key in _rows(data / f"{subscriber}.db",
                                                     EFFECTS[subscriber]))
        for order in orders:
            for key in expected_keys(subscriber, order):
                if effects[key] == 0:
                    missing.add(key[0])
        for key, count in effects.items():
            if count > 1:
                duplicates += count - 1
                duplicate_examples.append(f"{subscriber}:{key}x{count}")
            if key[0] not in accepted_ids:
                unexpected += count
    # Only "?" placeholders are formatted into these queries; the names are bound.
    among = f"({','.join('?' * len(subscribers))})"
    outcomes = Counter({outcome: int(count) for outcome, count in _rows(
        data / "order.db",
        f"SELECT outcome, count(*) FROM deliveries WHERE subscriber IN {among} "  # noqa: S608
        "GROUP BY outcome", tuple(subscribers))})
    handled = _rows(data / "order.db",
                    "SELECT count(*) FROM deliveries d "  # noqa: S608
                    "JOIN orders o ON o.event_id = d.event_id "
                    f"WHERE d.outcome = 'handled' AND d.subscriber IN {among}",
                    tuple(subscribers))
    return Ledger(
        accepted=len(orders),
        lost=len(missing),
        duplicates=duplicates,
        unexpected=unexpected,
        redeliveries=outcomes["duplicate"] + outcomes["retried"],
        handled_receipts=int(handled[0][0]) if handled else 0,
        outcomes=dict(outcomes),
        lost_examples=sorted(missing)[:5],
        duplicate_examples=duplicate_examples[:5],
    )


@dataclass(frozen=True)
class LedgerLine:
    """One test's line in the fault suite's report."""

    test: str
    sent: int
    accepted: int
    lost: int
    duplicates: int
    #: Receipts saying duplicate or retried (the order service's deliveries table).
    redeliveries: int
    #: The broker's own count of redelivered messages on the test's queues (management API;
    #: it restarts from zero when the broker's app restarts). None when it did not answer.
    broker_redeliveries: int | None
    recovery_s: float | None
    note: str = ""

    def render(self) -> str:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}s"
        broker = "?" if self.broker_redeliveries is None else str(self.broker_redeliveries)
        return (f"{self.test}\n    sent={self.sent} accepted={self.accepted} lost={self.lost} "
                f"duplicates={self.duplicates} redeliveries={self.redeliveries} (receipts), "
                f"{broker} (broker) recovery={recovery}" + (f" | {self.note}" if self.note
                                                             else ""))


class Report(Protocol):
    """The `report` fixture: records a test's ledger line for the run's summary."""

    async def __call__(self, *, recovery_s: float | None = ..., note: str = ...,
                       ledger: Ledger | None = ..., sent: int | None = ...) -> LedgerLine: ...
