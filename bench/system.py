"""The system as a user runs it: each service a process, with its own prefix, data and ports.

The harness reads the subscribers' own SQLite databases to know when an order's effect is
committed (inventory's reservations, logistics' shipments, the sellers' notifications), and
the order service's database to know when the whole flow, receipts and outcomes included,
has come back. It reads row ids, not counts: a table's rows are only ever added here, so
`max(rowid)` is the number of rows, and costs the same at 100 rows and at 100,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncConnection

from bench import amqp
from bench.orders import LINES, ROWS_PER_ORDER, new_order, order_body, seed_stock
from bench.procfs import broker_pid, cpu_seconds, rss_bytes
from common.events import Event
from common.kit.declare import Delivery
from common.kit.logging import configure_logging
from common.kit.runner import Runtime, ServiceRunner
from common.ops.observe import sweep_prefix
from order_service.domain.order import place_order
from order_service.service import service as order
from order_service.store import OrderStore

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"order": "order_service", "inventory": "inventory_service",
           "logistics": "logistics_service", "seller": "seller_service"}
SUBSCRIBERS = amqp.SUBSCRIBERS
SERVICES = ("order", *SUBSCRIBERS)
#: Each subscriber's effect table and the column stamped inside its delivery's transaction.
EFFECTS = {"inventory": ("reservations", "reserved_at"),
           "logistics": ("shipments", "created_at"),
           "seller": ("notifications", "created_at")}
#: What the order service records per order once the flow is back: an outcome each for the
#: stock, the shipment and every seller; a receipt from each subscriber of OrderPlaced, and
#: one of its own for each outcome event it handled (it is a subscriber of those).
OUTCOMES_PER_ORDER = 2 + len(LINES)
RECEIPTS_PER_ORDER = len(SUBSCRIBERS) + OUTCOMES_PER_ORDER


class SystemDownError(RuntimeError):
    """A service exited, or the system did not get where it should within its deadline."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parse_db_time(value: str) -> float:
    """An SQLite timestamp as SQLAlchemy stores it (naive, UTC) as epoch seconds."""
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


def _query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=30)
    try:
        return list(conn.execute(sql, params).fetchall())
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


@dataclass
class Placed:
    """One accepted order: its id, when the API accepted it (placed_at, epoch seconds), and
    the client's round trip (seconds, None when not over HTTP)."""

    order_id: uuid.UUID
    placed_at: float
    round_trip: float | None = None


@dataclass
class Placement:
    placed: list[Placed] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    started: float = 0.0  # epoch seconds of the first send
    finished: float = 0.0  # epoch seconds of the last answer
    #: Open loop only: how far behind its schedule the latest send went out, in seconds,
    #: and the epoch seconds of the last send.
    max_send_lag: float = 0.0
    last_sent: float = 0.0

    def refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1


@dataclass
class Mark:
    """Row ids in each table before a batch: what comes after belongs to the batch."""

    effects: dict[str, int]
    deliveries: int
    outcomes: int


@dataclass
class Effects:
    """A batch's effects, read back from the subscribers' databases."""

    #: Per subscriber: order id -> when its delivery's transaction stamped the effect (the
    #: latest row of the order: the commit follows the last insert).
    at: dict[str, dict[uuid.UUID, float]]
    #: Per subscriber: rows written beyond one effect per (order, SKU or seller).
    extra_rows: dict[str, int]

    def orders(self, service: str) -> int:
        return len(self.at.get(service, {}))

    def last(self) -> float:
        return max(ts for rows in self.at.values() for ts in rows.values())

    def first(self) -> float:
        return min(ts for rows in self.at.values() for ts in rows.values())

    def last_commit(self, order_id: uuid.UUID) -> float | None:
        """When the last subscriber stamped its effect for the order (None: one is missing)."""
        stamps = [rows.get(order_id) for rows in self.at.values()]
        if len(stamps) < len(SUBSCRIBERS) or any(s is None for s in stamps):
            return None
        return max(s for s in stamps if s is not None)


class System:
    """The four services as processes (or the order service in this process), under one
    prefix with one data folder, on one broker."""

    def __init__(self, amqp_url: str, management_url: str, tmp: Path, name: str) -> None:
        self.amqp_url = amqp_url
        self.management_url = management_url
        self.prefix = f"bench{os.getpid()}{uuid.uuid4().hex[:6]}.{name}."
        self.tmp = tmp
        self.data = tmp / "data"
        self.logs = tmp / "logs"
        self.data.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "AMQP_URL": amqp_url,
            "RABBITMQ_MANAGEMENT_URL": management_url,
            "SHOP_NAME_PREFIX": self.prefix,
            "SHOP_DATA_DIR": str(self.data),
            "ORDER_HTTP_PORT": str(self.port),
            "SHOP_API_URL": self.api,
            # Ports of their own are not needed; the defaults would clash with other runs.
            "ORDER_METRICS_PORT": "0",
            "INVENTORY_METRICS_PORT": "0",
            "LOGISTICS_METRICS_PORT": "0",
            "SELLER_METRICS_PORT": "0",
            "INVENTORY_SEED_CATALOGUE": "false",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: Services stopped on purpose, and how each stop went: (seconds, killed).
        self.stopped: dict[str, tuple[float, bool]] = {}
        self.runner: ServiceRunner[Delivery] | None = None
        self.runtime: Runtime[Delivery] | None = None
        self.broker_pid = broker_pid(amqp_url)

    # --- processes ----------------------------------------------------------------------

    def db(self, service: str) -> Path:
        return self.data / f"{service}.db"

    def queue(self, service: str) -> str:
        return f"{self.prefix}{service}.order.placed"

    async def seed(self) -> None:
        await seed_stock(self.data)

    def start(self, *services: str) -> None:
        for service in services:
            if self.running(service):
                raise SystemDownError(f"{service} already runs")
            self.stopped.pop(service, None)
            with (self.logs / f"{service}.log").open("ab") as out:
                self.procs[service] = subprocess.Popen(
                    [sys.executable, "-m", MODULES[service]], cwd=ROOT, env=self.env,
                    stdout=out, stderr=subprocess.STDOUT)

    def running(self, service: str) -> bool:
        return service in self.procs and self.procs[service].poll() is None

    async def stop(self, *services: str, timeout: float = 30) -> None:
        """SIGTERM, then wait for the clean exit (SIGKILL after `timeout`); how long each
        took, and whether it had to be killed, is kept in `stopped`."""
        started = time.monotonic()
        for service in services:
            if self.running(service):
                self.procs[service].send_signal(signal.SIGTERM)
        for service in services:
            proc = self.procs.get(service)
            if proc is None:
                continue
            killed = False
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                killed = True
                await asyncio.to_thread(proc.wait)
            self.stopped[service] = (time.monotonic() - started, killed)

    async def shutdown(self) -> dict[str, tuple[float, bool]]:
        """Stop everything this system started, whatever state it is in; returns how each
        process's stop went (seconds from SIGTERM to exit, and whether it was killed)."""
        running = [s for s in self.procs if self.running(s)]
        try:
            await self.stop_inprocess()
        finally:
            await self.stop(*self.procs)
        return {s: self.stopped[s] for s in running if s in self.stopped}

    def check_alive(self) -> None:
        for service, proc in self.procs.items():
            if service in self.stopped:
                continue
            if proc.poll() is not None:
                raise SystemDownError(f"{service} exited with code {proc.returncode}\n"
                                  f"{self.log_tail(service)}")

    def log_tail(self, service: str, lines: int = 20) -> str:
        path = self.logs / f"{service}.log"
        if not path.exists():
            return f"(no log for {service})"
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last lines of {service}'s log ({path}) ---\n" + "\n".join(tail)

    async def wait(self, condition: Callable[[], Any], *, timeout: float, what: str,
                   interval: float = 0.05) -> Any:
        """Call `condition` (in a thread) until it returns something truthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            self.check_alive()
            last = await asyncio.to_thread(condition)
            if last:
                return last
            if time.monotonic() >= deadline:
                raise SystemDownError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                  f"last: {str(last)[:300]}")
            await asyncio.sleep(interval)  # polling interval under a deadline

    async def ready(self, *services: str, timeout: float = 90) -> None:
        """Wait until the API answers healthy (the order process), and each subscriber
        consumes its queue and is in the order service's registry."""
        subscribers = [s for s in services if s in SUBSCRIBERS]
        deadline = time.monotonic() + timeout

        async def check() -> bool:
            self.check_alive()
            if subscribers:
                try:
                    counts = await amqp.queue_counts(self.amqp_url,
                                                     [self.queue(s) for s in subscribers])
                except Exception:  # the broker is away or the queue not there yet
                    return False
                if len(counts) < len(subscribers) or any(c == 0 for _, c in counts.values()):
                    return False
            if "order" in services:
                try:
                    async with httpx.AsyncClient(timeout=2) as client:
                        if (await client.get(f"{self.api}/healthz")).status_code != 200:
                            return False
                except httpx.HTTPError:
                    return False
            return True

        while not await check():
            if time.monotonic() >= deadline:
                raise SystemDownError(f"{', '.join(services)} not ready within {timeout:.0f} s\n"
                                  + "\n".join(self.log_tail(s) for s in services
                                              if s in self.procs))
            await asyncio.sleep(0.2)  # polling interval under a deadline

    async def registered(self, timeout: float = 90) -> None:
        """Wait until the order service's registry lists every subscriber, so orders
        expect all three (the announcements travel through the audit queue)."""

        def listed() -> bool:
            rows = _query(self.db("order"), "SELECT name FROM subscribers")
            return {r[0] for r in rows} >= set(SUBSCRIBERS)

        await self.wait(listed, timeout=timeout, what="the subscribers' announcements",
                        interval=0.2)

    # --- the order service in this process (the direct publishing path) -----------------

    async def start_inprocess(self) -> Runtime[Delivery]:
        """The order service's runner (consumers, tracker, outbox relay) in this process,
        without its HTTP API: orders are committed through its runtime directly."""
        if self.running("order"):
            raise SystemDownError("the order service already runs as a process")
        settings = order.settings(amqp_url=self.amqp_url, name_prefix=self.prefix,
                                  data_dir=self.data, metrics_port=0, log_level="WARNING",
                                  log_format="json", http_port=self.port)
        configure_logging(settings)
        self.runner = ServiceRunner(order.spec(settings), settings, broker_wait=60)
        self.runtime = await self.runner.__aenter__()
        return self.runtime

    async def stop_inprocess(self) -> None:
        runner, self.runner, self.runtime = self.runner, None, None
        if runner is not None:
            await runner.stop()

    # --- placing orders -----------------------------------------------------------------

    async def place_direct(self, count: int, concurrency: int) -> Placement:
        """`count` orders through the publishing path: place_order, OrderStore.add_order and
        the event in one transaction (runtime.execute), `concurrency` at a time."""
        runtime = self.runtime
        if runtime is None:
            raise SystemDownError("start_inprocess first")
        placement = Placement(started=time.time())
        remaining = count
        order = new_order()

        async def lane() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                event = place_order(order)

                async def work(conn: AsyncConnection, event: Any = event) -> list[Event]:
                    await OrderStore(conn).add_order(event)
                    return [event]

                await runtime.execute(work)
                placement.placed.append(Placed(event.order_id, event.occurred_at.timestamp()))

        await asyncio.gather(*(lane() for _ in range(min(concurrency, count))))
        placement.finished = time.time()
        return placement

    def client(self, concurrency: int) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        return httpx.AsyncClient(base_url=self.api, timeout=60, limits=limits)

    async def read_times(self) -> dict[str, float]:
        """Milliseconds the operator's reads take: GET /system twice (the first look after
        a while settles the orders answered since), the late list, the latest orders."""
        times: dict[str, float] = {}
        async with self.client(1) as client:
            for key, path in (("system_first", "/system"), ("system_next", "/system"),
                              ("late_orders", "/orders?late=true"), ("orders", "/orders")):
                if key == "system_next":
                    await asyncio.sleep(1.1)  # past GET /system's one-second cache
                started = time.perf_counter()
                response = await client.get(path)
                response.raise_for_status()
                times[key] = round((time.perf_counter() - started) * 1000, 1)
        return times

    @staticmethod
    async def _post(client: httpx.AsyncClient, body: dict[str, Any], placement: Placement
                    ) -> None:
        sent = time.perf_counter()
        try:
            response = await client.post("/orders", json=body)
        except httpx.HTTPError as exc:
            placement.refuse(type(exc).__name__)
            return
        took = time.perf_counter() - sent
        if response.status_code != 202:
            placement.refuse(str(response.status_code))
            return
        answer = response.json()
        placed_at = datetime.fromisoformat(answer["order"]["placed_at"]).timestamp()
        placement.placed.append(Placed(uuid.UUID(answer["order_id"]), placed_at, took))

    async def place_http(self, count: int, concurrency: int) -> Placement:
        """`count` orders over POST /orders, `concurrency` requests in flight (closed loop)."""
        placement = Placement(started=time.time())
        remaining = count
        body = order_body()
        async with self.client(concurrency) as client:

            async def lane() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await self._post(client, body, placement)

            await asyncio.gather(*(lane() for _ in range(min(concurrency, count))))
        placement.finished = time.time()
        return placement

    async def place_open_loop(self, rate: float, seconds: float, max_in_flight: int = 256
                              ) -> Placement:
        """Orders sent on a fixed schedule (`rate` a second for `seconds`), each when its time
        comes whatever the earlier ones are doing: an open loop, as real customers are."""
        total = max(1, round(rate * seconds))
        placement = Placement(started=time.time())
        body = order_body()
        loop = asyncio.get_running_loop()
        async with self.client(max_in_flight) as client:
            tasks: list[asyncio.Task[None]] = []
            start = loop.time() + 0.05
            for n in range(total):
                due = start + n / rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # the schedule of the offered load
                placement.max_send_lag = max(placement.max_send_lag, loop.time() - due)
                tasks.append(asyncio.create_task(self._post(client, body, placement)))
            placement.last_sent = time.time()
            await asyncio.gather(*tasks)
        placement.finished = time.time()
        return placement

    # --- reading the databases ----------------------------------------------------------

    def _max_rowid(self, service: str, table: str) -> int:
        rows = _query(self.db(service), f"SELECT max(rowid) FROM {table}")  # noqa: S608 - ours
        return int(rows[0][0] or 0) if rows else 0

    def mark(self) -> Mark:
        return Mark(effects={s: self._max_rowid(s, EFFECTS[s][0]) for s in SUBSCRIBERS},
                    deliveries=self._max_rowid("order", "deliveries"),
                    outcomes=self._max_rowid("order", "outcomes"))

    async def effects_done(self, mark: Mark, orders: int, *, timeout: float,
                           subscribers: Iterable[str] = SUBSCRIBERS) -> None:
        """Wait until every one of `subscribers` has committed the effects of `orders`
        orders placed after `mark`."""
        wanted = list(subscribers)

        def done() -> bool:
            return all(self._max_rowid(s, EFFECTS[s][0]) - mark.effects[s]
                       >= orders * ROWS_PER_ORDER[s] for s in wanted)

        def progress() -> str:
            return ", ".join(f"{s} {self._max_rowid(s, EFFECTS[s][0]) - mark.effects[s]}"
                             f"/{orders * ROWS_PER_ORDER[s]} rows" for s in wanted)

        try:
            await self.wait(done, timeout=timeout, what=f"the effects of {orders} orders")
        except SystemDownError as exc:
            raise SystemDownError(f"{exc} ({progress()})") from None

    async def flow_done(self, mark: Mark, orders: int, *, timeout: float) -> None:
        """Wait until the order service holds every receipt and outcome of the batch: the
        whole flow is back, nothing of it is still in flight."""

        def done() -> bool:
            return (self._max_rowid("order", "deliveries") - mark.deliveries
                    >= orders * RECEIPTS_PER_ORDER
                    and self._max_rowid("order", "outcomes") - mark.outcomes
                    >= orders * OUTCOMES_PER_ORDER)

        await self.wait(done, timeout=timeout, what=f"the receipts and outcomes of {orders} "
                                                    "orders in the order service",
                        interval=0.1)

    def effects(self, mark: Mark, subscribers: Iterable[str] = SUBSCRIBERS) -> Effects:
        """The batch's effects after `mark`: per order, when each subscriber stamped it."""
        at: dict[str, dict[uuid.UUID, float]] = {}
        extra: dict[str, int] = {}
        for service in subscribers:
            table, column = EFFECTS[service]
            rows = _query(self.db(service),
                          f"SELECT order_id, {column} FROM {table} WHERE rowid > ?",  # noqa: S608
                          (mark.effects[service],))
            stamps: dict[uuid.UUID, float] = {}
            for order_id, stamp in rows:
                key = uuid.UUID(str(order_id))
                stamps[key] = max(stamps.get(key, 0.0), _parse_db_time(stamp))
            at[service] = stamps
            extra[service] = len(rows) - len(stamps) * ROWS_PER_ORDER[service]
        return Effects(at=at, extra_rows=extra)

    def table_rows(self) -> dict[str, int]:
        """Rows of the tables that grow with history (outbox, inbox, receipts, orders)."""
        counts: dict[str, int] = {}
        for service in SERVICES:
            for table in ("kit_outbox", "kit_inbox"):
                counts[f"{service}.{table}"] = self._max_rowid(service, table)
        for table in ("orders", "deliveries", "outcomes"):
            counts[f"order.{table}"] = self._max_rowid("order", table)
        return counts

    def db_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for service in SERVICES:
            files = [self.db(service), self.db(service).with_suffix(".db-wal")]
            sizes[service] = sum(f.stat().st_size for f in files if f.exists())
        return sizes

    # --- processes' costs ---------------------------------------------------------------

    def pids(self) -> dict[str, int]:
        """The processes whose CPU counts for the system: each service (the order service is
        this process while it runs in-process) and the broker when it is on this machine."""
        pids = {s: p.pid for s, p in self.procs.items() if p.poll() is None}
        if self.runner is not None:
            pids["order"] = os.getpid()
        if self.broker_pid is not None:
            pids["broker"] = self.broker_pid
        return pids

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of every process of the system, and of this one ("bench")."""
        found = {name: cpu_seconds(pid) for name, pid in self.pids().items()}
        found["bench"] = cpu_seconds(os.getpid())
        return {name: value for name, value in found.items() if value is not None}

    def rss(self) -> dict[str, int]:
        found = {name: rss_bytes(pid) for name, pid in self.pids().items() if name != "broker"}
        return {name: value for name, value in found.items() if value is not None}

    # --- cleaning up --------------------------------------------------------------------

    async def delete_names(self) -> None:
        queues, exchanges = amqp.system_names(self.prefix)
        with contextlib.suppress(Exception):
            await amqp.delete(self.amqp_url, queues, exchanges)
        await asyncio.to_thread(sweep_prefix, self.management_url, self.prefix)
