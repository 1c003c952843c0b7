"""The cases: raw baselines, the peer, the kit's runner, and the whole system under load.

Each case returns a flat dict of figures (numbers, or None when not measured) for one round;
the runner collects the rounds and summarises them. Every case uses a name prefix of its
own and deletes what it declared; every process it starts is stopped when it ends, however
it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractRobustConnection
from rich.console import Console

from bench import amqp
from bench.node import Node, node_port, why_no_node
from bench.orders import order_body, order_message
from bench.procfs import cpu_seconds
from bench.profile import recording
from bench.system import SUBSCRIBERS, Effects, Placement, System
from bench.worker import KIT_SERVICE
from common.events import OrderPlaced
from common.kit.topology import Topology
from common.ops.observe import sweep_prefix

Figures = dict[str, Any]
ROOT = Path(__file__).resolve().parents[1]

#: The pydantic-validating consumers of the consume cases.
CONSUMERS = ("raw", "faststream", "kit")


@dataclass(frozen=True)
class Params:
    """How big each case is; `make bench` and `make bench-smoke` pick two sets of these."""

    amqp_url: str
    management_url: str
    smoke: bool = False
    rounds: int = 3
    fanout_orders: int = 5_000
    consume_messages: int = 10_000
    system_orders: int = 2_000
    window: int = 128
    prefetch: int = 256
    direct_concurrency: int = 32
    http_concurrency: int = 32
    loads: tuple[float, ...] = (50.0, 100.0, 200.0)
    load_seconds: float = 6.0
    warmup_orders: int = 300
    growth_orders: int = 100_000
    growth_batch: int = 2_000
    #: Alternating batches on a fresh system and the grown one, for the throughput ratio.
    growth_pairs: int = 3
    outage_seconds: float = 3.0
    outage_rate: float = 20.0
    backlog_orders: int = 2_000
    #: Orders in the history case's order database.
    history_orders: int = 100_000
    timeout: float = 600.0
    cases: frozenset[str] = field(default_factory=frozenset)
    #: Where py-spy flame graphs of the system cases go (None: no profiling).
    profile: Path | None = None


@dataclass
class Context:
    params: Params
    tmp: Path
    console: Console
    run_id: str = field(default_factory=lambda: f"bench{os.getpid()}{uuid.uuid4().hex[:4]}")
    broker_pid: int | None = None
    #: Services that were slow to stop on SIGTERM, or had to be killed: a finding, not noise.
    slow_stops: list[dict[str, Any]] = field(default_factory=list)

    async def shut_down(self, system: System, where: str) -> None:
        """Stop the system; note any service that took longer than its shutdown timeout
        (SHOP_SHUTDOWN_TIMEOUT, 10 s) plus a margin, or was killed after 30 s."""
        for service, (took, killed) in (await system.shutdown()).items():
            if killed or took > 15:
                self.slow_stops.append({"where": where, "service": service,
                                        "seconds": round(took, 1), "killed": killed})
                self.say(f"[yellow]{service} took {took:.1f} s to stop on SIGTERM"
                         f"{' and was killed' if killed else ''} ({where})[/yellow]")

    def prefix(self, name: str) -> str:
        return f"{self.run_id}.{name}{uuid.uuid4().hex[:4]}."

    def deadline(self, count: int) -> float:
        """Seconds to wait for `count` orders or messages: the base timeout, plus time for a
        system as slow as 5 orders/s, so a slow machine is measured rather than failed."""
        return self.params.timeout + count / 5

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}")


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile (fraction 0.99 for p99); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def per_thousand(before: dict[str, float], after: dict[str, float], count: int
                 ) -> dict[str, float]:
    """CPU seconds per 1,000 orders of each process between two readings."""
    return {name: round((after[name] - before[name]) / count * 1000, 3)
            for name in after if name in before and count}


# --- consumers in processes of their own ------------------------------------------------


class Worker:
    """`python -m bench.worker`: one consumer process, talking JSON lines on its stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, kind: str) -> None:
        self.proc = proc
        self.log = log
        self.kind = kind

    @classmethod
    async def start(cls, ctx: Context, kind: str, url: str, queue: str, count: int, *,
                    prefix: str = "", data_dir: Path | None = None) -> Worker:
        log = ctx.tmp / f"worker-{kind}-{uuid.uuid4().hex[:6]}.log"
        args = [kind, "--url", url, "--queue", queue, "--count", str(count),
                "--prefetch", str(ctx.params.prefetch), "--prefix", prefix,
                "--timeout", str(ctx.deadline(count))]
        if data_dir is not None:
            args += ["--data-dir", str(data_dir)]
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.worker", *args, stdout=asyncio.subprocess.PIPE,
                stderr=err, cwd=ROOT)
        return cls(proc, log, kind)

    async def _line(self, key: str, timeout: float) -> Any:
        if self.proc.stdout is None:
            raise RuntimeError("the consumer's stdout is not a pipe")
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    await self.proc.wait()
                    raise RuntimeError(f"{self.kind} consumer exited ({self.proc.returncode}) "
                                       f"before {key!r}:\n{self.tail()}")
                with contextlib.suppress(json.JSONDecodeError):
                    message = json.loads(raw)
                    if isinstance(message, dict) and key in message:
                        return message[key]

    async def ready(self, timeout: float = 60) -> None:
        await self._line("ready", timeout)

    async def result(self, timeout: float) -> dict[str, Any]:
        result: dict[str, Any] = await self._line("result", timeout)
        await self.proc.wait()
        return result

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()[-15:]
        return "\n".join(lines)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


async def _stop_all(workers: Sequence[Worker]) -> None:
    for worker in workers:
        await worker.stop()


async def _declared_cleanup(ctx: Context, topology: Topology, extra_queues: Sequence[str] = (),
                            extra_exchanges: Sequence[str] = ()) -> None:
    url = ctx.params.amqp_url
    with contextlib.suppress(Exception):
        await amqp.delete(url, [*topology.declared_queues, *extra_queues],
                          [*topology.declared_exchanges, *extra_exchanges])
    await asyncio.to_thread(sweep_prefix, ctx.params.management_url, topology.prefix)


def _broker_cpu(ctx: Context) -> float | None:
    return cpu_seconds(ctx.broker_pid) if ctx.broker_pid is not None else None


# --- 1. raw fanout ------------------------------------------------------------------------


async def raw_fanout(ctx: Context) -> Figures:
    """N persistent, confirmed, mandatory messages to a fanout exchange with three durable
    quorum queues declared as the subscribers' are; three raw aio-pika consumers (each a
    process) validate every message with pydantic and ack. Until all three have all."""
    p = ctx.params
    count = p.fanout_orders
    topology = Topology(ctx.prefix("fanout"))
    queues = [topology.queue(f"raw{n}", OrderPlaced) for n in (1, 2, 3)]
    workers: list[Worker] = []
    connection: AbstractRobustConnection | None = None
    try:
        connection = await amqp.connect(p.amqp_url)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        for queue in queues:
            exchange, _ = await amqp.declare_subscriber_queue(channel, topology, queue)
        for queue in queues:
            workers.append(await Worker.start(ctx, "raw", p.amqp_url, queue, count))
        await asyncio.gather(*(w.ready() for w in workers))
        cpu_before = time.process_time(), _broker_cpu(ctx)
        started = time.monotonic()
        publish_s = await amqp.publish_window(exchange, count, p.window,
                                              lambda: order_message()[1])
        results = await asyncio.gather(*(w.result(ctx.deadline(count)) for w in workers))
        elapsed = max(r["last"] for r in results) - started
        broker_after = _broker_cpu(ctx)
        broker_cpu = (broker_after - cpu_before[1] if broker_after is not None
                      and cpu_before[1] is not None else None)
        return {
            "orders_per_s": count / elapsed,
            "publish_confirmed_per_s": count / publish_s,
            "invalid": sum(r["invalid"] for r in results),
            "cpu_s_per_1000": {
                "publisher": round((time.process_time() - cpu_before[0]) / count * 1000, 3),
                **{f"consumer{n}": round(r["cpu_s"] / count * 1000, 3)
                   for n, r in enumerate(results, start=1)},
                **({"broker": round(broker_cpu / count * 1000, 3)}
                   if broker_cpu is not None else {}),
            },
            "window": p.window,
            "prefetch": p.prefetch,
            "orders": count,
        }
    finally:
        await _stop_all(workers)
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
        await _declared_cleanup(ctx, topology)


# --- 2 and 3. consuming one preloaded queue ---------------------------------------------


async def consume(ctx: Context, kind: str) -> Figures:
    """Preload one queue (declared as the kit declares a subscriber's) with N OrderPlaced,
    then drain it with one consumer: raw aio-pika, FastStream or the kit's runner with a
    handler that does nothing. From the first arrival to the last ack."""
    p = ctx.params
    count = p.consume_messages
    topology = Topology(ctx.prefix(kind))
    queue = topology.queue(KIT_SERVICE, OrderPlaced)
    data_dir = ctx.tmp / f"kit-{uuid.uuid4().hex[:6]}"
    worker: Worker | None = None
    try:
        connection = await amqp.connect(p.amqp_url)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange, _ = await amqp.declare_subscriber_queue(channel, topology, queue)
            await amqp.publish_window(exchange, count, p.window, lambda: order_message()[1])
        finally:
            await connection.close()
        ready, _ = (await amqp.queue_counts(p.amqp_url, [queue]))[queue]
        if ready != count:
            raise RuntimeError(f"preloaded {count} messages but the queue holds {ready}")
        worker = await Worker.start(ctx, kind, p.amqp_url, queue, count,
                                    prefix=topology.prefix, data_dir=data_dir)
        await worker.ready()
        broker_before = _broker_cpu(ctx)
        result = await worker.result(ctx.deadline(count))
        broker_after = _broker_cpu(ctx)
        elapsed = result["last"] - result["first"]
        figures: Figures = {
            "msg_per_s": count / elapsed,
            "invalid": result["invalid"],
            "cpu_s_per_1000": round(result["cpu_s"] / count * 1000, 3),
            "broker_cpu_s_per_1000": (round((broker_after - broker_before) / count * 1000, 3)
                                      if broker_after is not None and broker_before is not None
                                      else None),
            "prefetch": p.prefetch,
            "messages": count,
        }
        if kind == "kit":
            figures["mean_batch"] = (round(count / result["batches"], 1)
                                     if result.get("batches") else None)
            published = result.get("receipts_published")
            figures["msg_per_s_receipts_published"] = (
                count / (published - result["first"]) if published else None)
            figures["cpu_s_per_1000_with_receipts"] = round(
                result["cpu_s_with_receipts"] / count * 1000, 3)
        return figures
    finally:
        if worker is not None:
            await worker.stop()
        # The kit also declared the audit exchange and queue (its receipts wait there).
        await _declared_cleanup(
            ctx, topology, [*topology.service_queues(queue),
                            *topology.service_queues(topology.audit_queue)],
            [topology.exchange(OrderPlaced), topology.audit_exchange,
             topology.dead_letter_exchange(queue),
             topology.dead_letter_exchange(topology.audit_queue)])


# --- 4. the whole system ------------------------------------------------------------------


def _accepted(placement: Placement) -> int:
    """How many orders were accepted; none at all is a failure, with the answers given."""
    if not placement.placed:
        raise RuntimeError(f"no order was accepted; refused: {placement.refused}")
    return len(placement.placed)


def _verify(placement: Placement, effects: Effects, subscribers: Sequence[str] = SUBSCRIBERS
            ) -> dict[str, int]:
    """Every accepted order has exactly its effects in each subscriber: lost and extra."""
    ids = {p.order_id for p in placement.placed}
    lost = sum(len(ids - effects.at.get(s, {}).keys()) for s in subscribers)
    unexpected = sum(len(effects.at.get(s, {}).keys() - ids) for s in subscribers)
    extra = sum(effects.extra_rows.get(s, 0) for s in subscribers)
    return {"lost": lost, "unexpected": unexpected, "duplicate_rows": extra}


async def measure_batch(ctx: Context, system: System, how: str, count: int) -> Figures:
    """Place `count` orders (`direct` or `http`), until all three subscribers committed their
    effects; CPU of each process until the whole flow (receipts, outcomes) is back."""
    p = ctx.params
    mark = await asyncio.to_thread(system.mark)
    pids = {name: pid for name, pid in system.pids().items() if name != "broker"}
    label = f"{ctx.run_id}-{system.prefix.split('.')[-2]}-{how}-{uuid.uuid4().hex[:4]}"
    async with recording(p.profile, label, pids):
        cpu_before = system.cpu()
        if how == "direct":
            placement = await system.place_direct(count, p.direct_concurrency)
        else:
            placement = await system.place_http(count, p.http_concurrency)
        placed = _accepted(placement)
        await system.effects_done(mark, placed, timeout=ctx.deadline(placed))
        effects = await asyncio.to_thread(system.effects, mark)
        await system.flow_done(mark, placed, timeout=ctx.deadline(placed))
        flow_back = time.time()
        cpu_after = system.cpu()
    cpu = per_thousand(cpu_before, cpu_after, placed)
    if how == "direct":
        cpu.pop("bench", None)  # the bench process is the order service here
    system_cpu = sum(v for k, v in cpu.items() if k != "bench")
    elapsed = effects.last() - placement.started
    return {
        "orders_per_s": placed / elapsed,
        "accepted_per_s": placed / (placement.finished - placement.started),
        "flow_back_per_s": placed / (flow_back - placement.started),
        "cpu_s_per_1000": cpu,
        "system_cpu_s_per_1000": round(system_cpu, 3),
        "rss_mb": {k: round(v / 2**20, 1) for k, v in system.rss().items()},
        "refused": sum(placement.refused.values()),
        **_verify(placement, effects),
        "orders": placed,
        "concurrency": p.direct_concurrency if how == "direct" else p.http_concurrency,
    }


async def latency(ctx: Context, system: System, rate: float) -> Figures:
    """Open-loop load at `rate` orders/s over HTTP; per order, from the API's accept
    (placed_at) to the last subscriber's effect stamp, which each subscriber writes inside
    the delivery's transaction just before its commit."""
    p = ctx.params
    mark = await asyncio.to_thread(system.mark)
    placement = await system.place_open_loop(rate, p.load_seconds)
    placed = _accepted(placement)
    await system.effects_done(mark, placed, timeout=ctx.deadline(placed))
    effects = await asyncio.to_thread(system.effects, mark)
    await system.flow_done(mark, placed, timeout=ctx.deadline(placed))
    delays = []
    for order in placement.placed:
        last = effects.last_commit(order.order_id)
        if last is not None:
            delays.append((last - order.placed_at) * 1000)
    trips = [o.round_trip * 1000 for o in placement.placed if o.round_trip is not None]
    sent = placed + sum(placement.refused.values())
    return {
        "offered_per_s": rate,
        # Sends over the schedule's span (the first send is at its start).
        "sent_per_s": (sent - 1) / max(1e-9, placement.last_sent - placement.started - 0.05)
        if sent > 1 else None,
        "accepted_per_s": placed / max(1e-9, placement.finished - placement.started),
        "p50_ms": percentile(delays, 0.50),
        "p95_ms": percentile(delays, 0.95),
        "p99_ms": percentile(delays, 0.99),
        "max_ms": max(delays) if delays else None,
        "http_p50_ms": percentile(trips, 0.50),
        "http_p99_ms": percentile(trips, 0.99),
        "max_send_lag_ms": round(placement.max_send_lag * 1000, 2),
        "refused": sum(placement.refused.values()),
        **_verify(placement, effects),
        "orders": placed,
    }


async def start_system(ctx: Context, system: System, *, inprocess: bool = False) -> None:
    await system.seed()
    system.start(*SUBSCRIBERS)
    await system.ready(*SUBSCRIBERS)
    if inprocess:
        await system.start_inprocess()
    else:
        system.start("order")
        await system.ready("order")
    await system.registered()


async def use_order_process(system: System) -> None:
    """The order service as its own process (HTTP API on)."""
    if system.runtime is not None:
        await system.stop_inprocess()
    if not system.running("order"):
        system.start("order")
        await system.ready("order")


async def use_inprocess_order(system: System) -> None:
    """The order service's runner in this process, for the direct publishing path."""
    if system.running("order"):
        await system.stop("order")
    if system.runtime is None:
        await system.start_inprocess()


async def warm_up(ctx: Context, system: System, count: int) -> None:
    mark = await asyncio.to_thread(system.mark)
    placement = await system.place_http(count, ctx.params.http_concurrency)
    await system.flow_done(mark, len(placement.placed), timeout=ctx.deadline(count))


# --- 6. growth ------------------------------------------------------------------------------


async def growth(ctx: Context) -> Figures:
    """Throughput (HTTP, concurrent clients) and each service's memory on a fresh system,
    then again after `growth_orders` more orders: the outbox, inbox and receipts grow.

    Memory is compared within the grown system, start to end. Throughput is compared with a
    second, fresh system measured in alternation with the grown one at the end: the speed of
    this machine's shared cores drifts by a third over the minutes a fill takes, which a
    start-to-end ratio would read as growth (or as a speed-up)."""
    p = ctx.params
    system = System(p.amqp_url, p.management_url, ctx.tmp / "growth", "growth")
    fresh = System(p.amqp_url, p.management_url, ctx.tmp / "fresh", "fresh")
    try:
        await start_system(ctx, system)
        await warm_up(ctx, system, p.warmup_orders)
        start = await measure_batch(ctx, system, "http", p.growth_batch)
        start_rows, start_sizes = system.table_rows(), system.db_sizes()
        start_reads = await system.read_times()
        ctx.say(f"growth: start {start['orders_per_s']:.0f} orders/s; placing "
                f"{p.growth_orders:,} orders")
        fill_rates = await _fill(ctx, system)
        end = await measure_batch(ctx, system, "http", p.growth_batch)
        end_reads = await system.read_times()
        rss_ratio = {name: round(end["rss_mb"][name] / start["rss_mb"][name], 3)
                     for name in end["rss_mb"] if start["rss_mb"].get(name)}
        await start_system(ctx, fresh)
        await warm_up(ctx, fresh, p.warmup_orders)
        pairs: list[dict[str, Figures]] = []
        for _ in range(p.growth_pairs):
            pairs.append({"fresh": await measure_batch(ctx, fresh, "http", p.growth_batch),
                          "grown": await measure_batch(ctx, system, "http", p.growth_batch)})
            ctx.say(f"growth: fresh {pairs[-1]['fresh']['orders_per_s']:.0f}, grown "
                    f"{pairs[-1]['grown']['orders_per_s']:.0f} orders/s")
        fresh_rate = statistics.median(pair["fresh"]["orders_per_s"] for pair in pairs)
        grown_rate = statistics.median(pair["grown"]["orders_per_s"] for pair in pairs)
        fresh_cpu = statistics.median(pair["fresh"]["system_cpu_s_per_1000"] for pair in pairs)
        grown_cpu = statistics.median(pair["grown"]["system_cpu_s_per_1000"] for pair in pairs)
        return {
            "throughput_ratio": grown_rate / fresh_rate,
            "fresh_orders_per_s": fresh_rate,
            "grown_orders_per_s": grown_rate,
            "cpu_ratio": grown_cpu / fresh_cpu,
            "fresh_system_cpu_s_per_1000": fresh_cpu,
            "grown_system_cpu_s_per_1000": grown_cpu,
            "pairs_orders_per_s": [[round(pair["fresh"]["orders_per_s"], 1),
                                    round(pair["grown"]["orders_per_s"], 1)] for pair in pairs],
            "fresh_cpu_s_per_1000": {name: statistics.median(
                pair["fresh"]["cpu_s_per_1000"][name] for pair in pairs)
                for name in pairs[0]["fresh"]["cpu_s_per_1000"]},
            "grown_cpu_s_per_1000": {name: statistics.median(
                pair["grown"]["cpu_s_per_1000"][name] for pair in pairs)
                for name in pairs[0]["grown"]["cpu_s_per_1000"]},
            "start_orders_per_s": start["orders_per_s"],
            "end_orders_per_s": end["orders_per_s"],
            "start_end_ratio": end["orders_per_s"] / start["orders_per_s"],
            "start_rss_mb": start["rss_mb"],
            "end_rss_mb": end["rss_mb"],
            "rss_ratio": rss_ratio,
            "reads_ms_start": start_reads,
            "reads_ms_end": end_reads,
            "worst_rss_ratio": max(rss_ratio.values()) if rss_ratio else None,
            "fill_orders_per_s": fill_rates,
            "rows_start": start_rows,
            "rows_end": system.table_rows(),
            "db_bytes_start": start_sizes,
            "db_bytes_end": system.db_sizes(),
            "lost": start["lost"] + end["lost"] + sum(
                pair[which]["lost"] for pair in pairs for which in ("fresh", "grown")),
            "growth_orders": p.growth_orders,
            "batch_orders": p.growth_batch,
        }
    finally:
        await ctx.shut_down(fresh, "growth (fresh)")
        await ctx.shut_down(system, "growth")
        await fresh.delete_names()
        await system.delete_names()


async def _fill(ctx: Context, system: System) -> list[float]:
    """Place `growth_orders` orders in chunks; orders/s of each chunk until the effects."""
    p = ctx.params
    chunk = max(1, min(10_000, p.growth_orders // 10 or 1))
    left = p.growth_orders
    fill_rates: list[float] = []
    fill_mark = await asyncio.to_thread(system.mark)
    filled = 0
    while left > 0:
        size = min(chunk, left)
        mark = await asyncio.to_thread(system.mark)
        placement = await system.place_http(size, p.http_concurrency)
        filled += len(placement.placed)
        await system.effects_done(mark, len(placement.placed),
                                  timeout=ctx.deadline(len(placement.placed)))
        effects = await asyncio.to_thread(system.effects, mark)
        fill_rates.append(round(len(placement.placed)
                                / (effects.last() - placement.started), 1))
        left -= size
        ctx.say(f"growth: {p.growth_orders - left:,}/{p.growth_orders:,} placed, "
                f"last chunk {fill_rates[-1]:.0f} orders/s")
    # The order service's part of the flow (receipts, outcomes) may lag the subscribers':
    # let it catch up, so the second measurement starts from a quiet system too.
    await system.flow_done(fill_mark, filled, timeout=ctx.deadline(filled))
    return fill_rates


# --- 7. recovery ------------------------------------------------------------------------


class SkippedError(Exception):
    """A case this machine cannot run (said why); under CI it fails instead."""


def recovery_node(ctx: Context) -> Node:
    """The throwaway node of the recovery case (not started yet)."""
    problem = why_no_node()
    if problem is not None:
        message = f"recovery needs a throwaway RabbitMQ node: {problem}"
        if os.environ.get("CI"):
            raise RuntimeError(f"{message} (CI is set, so every case must run)")
        raise SkippedError(message)
    return Node(f"{ctx.run_id}rec", node_port())


async def start_node(ctx: Context, node: Node) -> Node:
    ctx.say(f"recovery: starting the throwaway node {node.node} on port {node.port}")
    try:
        await node.start()
    except BaseException:
        await node.destroy()
        raise
    return node


async def recovery(ctx: Context, node: Node, started: asyncio.Task[Node] | None = None
                   ) -> Figures:
    """On a throwaway node: restart the broker (stop_app / start_app) under a steady stream
    of orders, time from its return to the first handled delivery; then stop a subscriber,
    let a backlog build, start it and time the drain. The node is destroyed afterwards."""
    p = ctx.params
    system: System | None = None
    try:
        await (started if started is not None else start_node(ctx, node))
        system = System(node.amqp_url, node.management_url, ctx.tmp / "recovery", "recovery")
        await start_system(ctx, system)
        await warm_up(ctx, system, p.warmup_orders)
        restart = await _broker_restart(ctx, node, system)
        backlog = await _backlog_drain(ctx, system)
        return {**restart, **backlog}
    finally:
        try:
            if system is not None:
                await ctx.shut_down(system, "recovery")
        finally:
            await node.destroy()


async def _broker_restart(ctx: Context, node: Node, system: System) -> Figures:
    p = ctx.params
    mark = await asyncio.to_thread(system.mark)
    placement = Placement(started=time.time())
    stop_stream = asyncio.Event()
    body = order_body()

    async def stream() -> None:
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        async with system.client(64) as client:
            start, n = loop.time(), 0
            while not stop_stream.is_set():
                delay = start + n / p.outage_rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # the schedule of the stream
                tasks.append(asyncio.create_task(system._post(client, body, placement)))
                n += 1
            await asyncio.gather(*tasks)

    streaming = asyncio.create_task(stream())
    try:
        await asyncio.sleep(1.0)  # orders flowing normally before the fault
        stopped_at = time.time()
        await node.ctl("stop_app")
        await asyncio.sleep(p.outage_seconds)  # the outage
        # The restart is timed from the start_app command: the node opens its listeners
        # during boot, before start_app returns, and clients may reconnect by then.
        restart_at = time.time()
        await node.ctl("start_app")
        await node.ctl("await_startup")
        up_at = time.time()

        def handled_after_restart() -> float | None:
            stamps = [ts for rows in system.effects(mark).at.values() for ts in rows.values()
                      if ts > restart_at]
            return min(stamps) if stamps else None

        first = await system.wait(handled_after_restart, timeout=ctx.deadline(0),
                                  what="a delivery handled after the broker restart",
                                  interval=0.05)
        await asyncio.sleep(1.0)  # a little more of the stream after recovery
    finally:
        stop_stream.set()
        await streaming
    placed = len(placement.placed)
    await system.effects_done(mark, placed, timeout=ctx.deadline(placed))
    effects = await asyncio.to_thread(system.effects, mark)
    during = [o for o in placement.placed if stopped_at <= o.placed_at <= restart_at]
    commits = [effects.last_commit(o.order_id) for o in during]
    all_back = (max(c for c in commits if c is not None)
                if commits and all(c is not None for c in commits) else None)
    return {
        "outage_s": restart_at - stopped_at,
        "start_app_s": up_at - restart_at,
        "restart_to_first_handled_s": first - restart_at,
        "restart_to_outage_orders_handled_s": (all_back - restart_at) if all_back else None,
        "orders_during_outage": len(during),
        "restart_orders": placed,
        "restart_refused": sum(placement.refused.values()),
        **{f"restart_{k}": v for k, v in _verify(placement, effects).items()},
    }


async def _backlog_drain(ctx: Context, system: System, subscriber: str = "logistics"
                         ) -> Figures:
    p = ctx.params
    count = p.backlog_orders
    await system.stop(subscriber)
    stop_s, killed = system.stopped[subscriber]
    mark = await asyncio.to_thread(system.mark)
    placement = await system.place_http(count, p.http_concurrency)
    placed = len(placement.placed)
    others = [s for s in SUBSCRIBERS if s != subscriber]
    await system.effects_done(mark, placed, timeout=ctx.deadline(placed), subscribers=others)
    # Every order is published (the others have it), so the backlog waits in the queue.
    backlog, _ = (await amqp.queue_counts(system.amqp_url, [system.queue(subscriber)])).get(
        system.queue(subscriber), (0, 0))
    spawned = time.time()
    system.start(subscriber)
    await system.effects_done(mark, placed, timeout=ctx.deadline(placed),
                              subscribers=[subscriber])
    effects = await asyncio.to_thread(system.effects, mark, [subscriber])
    stamps = effects.at[subscriber].values()
    first, last = min(stamps), max(stamps)
    return {
        "backlog_messages": backlog,
        "backlog_start_to_first_handled_s": first - spawned,
        "backlog_drain_per_s": placed / (last - first) if last > first else None,
        "backlog_lost": _verify(placement, effects, [subscriber])["lost"],
        # SIGTERM to exit, after the broker restart; killed after 30 s if it had not exited.
        "subscriber_stop_s": round(stop_s, 2),
        "subscriber_stop_killed": killed,
        "backlog_orders": placed,
    }


# --- the run's context -----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "python": sys.version.split()[0]}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    with contextlib.suppress(OSError):
        info["load_average"] = Path("/proc/loadavg").read_text().split()[:3]
    return info


async def broker_version(url: str) -> str | None:
    with contextlib.suppress(Exception):
        connection = await amqp.connect(url)
        try:
            props = connection.transport.connection.server_properties  # type: ignore[union-attr]
            version = props.get("version")
            return version.decode() if isinstance(version, bytes) else str(version)
        finally:
            await connection.close()
    return None
