"""`python -m bench`: every case in one run, alternating over rounds; a table and a JSON file.

`make bench` runs the full sizes; `make bench-smoke` (CI) tiny ones, to show that every case
completes, with no timing goal. See README, "Performance".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from rich.console import Console

from bench import cases, history
from bench.cases import CONSUMERS, Context, Figures, Params, SkippedError
from bench.node import Node
from bench.procfs import broker_pid
from bench.report import goal_records, render, summaries, write_json
from bench.system import System

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ALL_CASES = ("fanout", "consume", "kit", "direct", "http", "latency", "growth", "history",
             "recovery")
SYSTEM_CASES = {"direct", "http", "latency"}

#: `make bench-smoke`: every case completes, in about a minute or two; figures mean nothing.
SMOKE = {
    "rounds": 1, "fanout_orders": 200, "consume_messages": 300, "system_orders": 40,
    "loads": (10.0, 20.0, 40.0), "load_seconds": 1.0, "warmup_orders": 10,
    "growth_orders": 100, "growth_batch": 30, "growth_pairs": 1, "outage_seconds": 1.0,
    "outage_rate": 10.0, "backlog_orders": 30, "history_orders": 500, "timeout": 120.0,
}


def _management_beside(amqp_url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(amqp_url)
    return (f"http://{parts.username or 'guest'}:{parts.password or 'guest'}@"
            f"{parts.hostname or 'localhost'}:15672/")


def parse(argv: Sequence[str] | None) -> tuple[Params, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    defaults = Params(amqp_url="", management_url="")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one round: every case completes (CI)")
    parser.add_argument("--rounds", type=int, help=f"rounds (default {defaults.rounds})")
    parser.add_argument("--cases", default=",".join(ALL_CASES),
                        help=f"comma-separated subset of {','.join(ALL_CASES)}")
    parser.add_argument("--fanout-orders", type=int,
                        help=f"case 1 messages (default {defaults.fanout_orders})")
    parser.add_argument("--consume-messages", type=int,
                        help=f"cases 2-3 messages (default {defaults.consume_messages})")
    parser.add_argument("--system-orders", type=int,
                        help=f"case 4 orders per path (default {defaults.system_orders})")
    parser.add_argument("--window", type=int, help="publishes in flight (default 128)")
    parser.add_argument("--prefetch", type=int,
                        help="prefetch of every consumer (default 256, the kit's)")
    parser.add_argument("--http-concurrency", type=int, help="HTTP requests in flight (32)")
    parser.add_argument("--direct-concurrency", type=int,
                        help="orders committed at once on the direct path (32)")
    parser.add_argument("--loads", help="offered loads for case 5, orders/s (50,100,200)")
    parser.add_argument("--load-seconds", type=float,
                        help=f"seconds of each load ({defaults.load_seconds:g})")
    parser.add_argument("--growth-orders", type=int,
                        help=f"orders between growth's two measurements "
                             f"(default {defaults.growth_orders:,})")
    parser.add_argument("--growth-batch", type=int, help="orders of each growth measurement")
    parser.add_argument("--growth-pairs", type=int,
                        help=f"growth's alternating batches on a fresh and the grown system "
                             f"(default {defaults.growth_pairs})")
    parser.add_argument("--history-orders", type=int,
                        help=f"orders in the history case's database "
                             f"(default {defaults.history_orders:,})")
    parser.add_argument("--backlog-orders", type=int,
                        help=f"case 7 backlog (default {defaults.backlog_orders})")
    parser.add_argument("--amqp-url", default=os.environ.get(
        "AMQP_URL", "amqp://guest:guest@localhost:5672/"))
    parser.add_argument("--management-url", default=os.environ.get("RABBITMQ_MANAGEMENT_URL"))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy flame graphs of every service during the system cases "
                             "(CPU figures then include py-spy's sampling cost)")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temporary folder (databases, service logs)")
    args = parser.parse_args(argv)

    chosen = frozenset(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = chosen - set(ALL_CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(ALL_CASES)}")
    overrides: dict[str, Any] = dict(SMOKE) if args.smoke else {}
    for name in ("rounds", "fanout_orders", "consume_messages", "system_orders", "window",
                 "prefetch", "http_concurrency", "direct_concurrency", "load_seconds",
                 "growth_orders", "growth_batch", "growth_pairs", "backlog_orders",
                 "history_orders"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.loads:
        overrides["loads"] = tuple(float(x) for x in args.loads.split(",") if x.strip())
    params = replace(defaults, amqp_url=args.amqp_url,
                     management_url=args.management_url or _management_beside(args.amqp_url),
                     smoke=args.smoke, cases=chosen, profile=args.profile, **overrides)
    if params.growth_batch == defaults.growth_batch and "growth_batch" not in overrides:
        params = replace(params, growth_batch=params.system_orders)
    return params, args


async def _check_broker(url: str) -> str | None:
    try:
        connection = await aio_pika.connect(url, timeout=10)
    except Exception as exc:  # any failure: say what and how to get one
        return f"{type(exc).__name__}: {exc}"
    await connection.close()
    return None


class Run:
    """The rounds, what each case measured, and what failed."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.rounds: dict[str, list[Figures]] = {}
        self.errors: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []

    async def attempt(self, key: str, round_no: int, work: Callable[[], Awaitable[Figures]],
                      headline: str) -> Figures | None:
        self.ctx.say(f"[bold]{key}[/bold] (round {round_no})")
        started = time.monotonic()
        try:
            figures = await work()
        except SkippedError as exc:
            self.skipped.append({"case": key, "reason": str(exc)})
            self.ctx.say(f"[yellow]{key} skipped[/yellow]: {exc}")
            return None
        except Exception as exc:  # recorded and reported; the other cases go on
            self.errors.append({"case": key, "round": round_no,
                                "error": f"{type(exc).__name__}: {exc}"})
            self.ctx.say(f"[red]{key} failed[/red]: {type(exc).__name__}: {exc}")
            return None
        self.rounds.setdefault(key, []).append(figures)
        value = figures.get(headline)
        shown = f"{value:,.1f} {headline}" if isinstance(value, int | float) else ""
        self.ctx.say(f"  {key}: {shown} [dim]({time.monotonic() - started:.1f} s)[/dim]")
        return figures


async def run(params: Params, console: Console, tmp: Path) -> dict[str, Any]:
    ctx = Context(params, tmp, console)
    ctx.broker_pid = broker_pid(params.amqp_url)
    started = datetime.now(UTC)
    info = {"machine": cases.machine(),
            "broker": {"version": await cases.broker_version(params.amqp_url),
                       "pid_found": ctx.broker_pid is not None}}
    ctx.say(f"broker RabbitMQ {info['broker']['version']} "
            f"(process {'found' if ctx.broker_pid else 'not on this machine: no broker CPU'}); "
            f"{info['machine'].get('cores')} cores, load {info['machine'].get('load_average')}")
    run_ = Run(ctx)
    chosen = params.cases
    # The smoke run boots the recovery case's node while the other cases run (it saves its
    # boot time); a full run boots it when the case comes, so it cannot disturb a figure.
    early = EarlyNode(ctx) if "recovery" in chosen and params.smoke else None
    try:
        if chosen & SYSTEM_CASES or any(c in chosen for c in ("fanout", "consume", "kit")):
            await _rounds(ctx, run_)
        if "growth" in chosen:
            await run_.attempt("growth", 1, functools.partial(cases.growth, ctx),
                               "throughput_ratio")
        if "history" in chosen:
            await run_.attempt("history", 1, functools.partial(
                history.history, str(ctx.tmp / "history.db"), params.history_orders),
                "look_ms")
        if "recovery" in chosen:
            await run_.attempt("recovery", 1, functools.partial(_recovery, ctx, early),
                               "restart_to_first_handled_s")
    finally:
        if early is not None:
            await early.discard()
    info["machine"]["load_average_end"] = cases.machine().get("load_average")
    return {
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "command": " ".join(sys.argv),
        **info,
        "params": {k: (sorted(v) if isinstance(v, frozenset) else v)
                   for k, v in asdict(params).items()
                   if k not in ("amqp_url", "management_url", "profile")},
        "notes": NOTES,
        "rounds": run_.rounds,
        "summary": summaries(run_.rounds),
        "goals": goal_records(run_.rounds),
        "errors": run_.errors,
        "skipped": run_.skipped,
        "slow_stops": ctx.slow_stops,
    }


async def _rounds(ctx: Context, run_: Run) -> None:
    """The alternating part: every round runs each baseline and each system case once."""
    params = ctx.params
    chosen = params.cases
    system: System | None = None
    try:
        if chosen & SYSTEM_CASES:
            system = System(params.amqp_url, params.management_url, ctx.tmp / "system",
                            "system")
            ctx.say(f"starting the system (prefix {system.prefix}, data {system.data})")
            try:
                await cases.start_system(ctx, system)
                await cases.warm_up(ctx, system, params.warmup_orders)
            except Exception as exc:  # every system case will say it failed
                run_.errors.append({"case": "system start", "round": 0,
                                    "error": f"{type(exc).__name__}: {exc}"})
                ctx.say(f"[red]the system did not start[/red]: {exc}")
        for round_no in range(1, params.rounds + 1):
            # Every case once per round; the baselines' order rotates so that none always
            # runs first, and the two system paths swap places every other round.
            baselines: list[tuple[str, Callable[[], Awaitable[Figures]], str]] = []
            if "fanout" in chosen:
                baselines.append(("fanout", functools.partial(cases.raw_fanout, ctx),
                                  "orders_per_s"))
            for kind in CONSUMERS:
                if ("kit" if kind == "kit" else "consume") not in chosen:
                    continue
                baselines.append((f"consume-{kind}", functools.partial(cases.consume, ctx, kind),
                                  "msg_per_s"))
            shift = (round_no - 1) % max(1, len(baselines))
            for key, work, headline in baselines[shift:] + baselines[:shift]:
                await run_.attempt(key, round_no, work, headline)
            paths = [h for h in ("direct", "http") if h in chosen]
            if round_no % 2 == 0:
                paths.reverse()
            for how in paths:
                await run_.attempt(f"system-{how}", round_no,
                                   functools.partial(_system_batch, ctx, system, how),
                                   "orders_per_s")
            if "latency" in chosen:
                for rate in params.loads:
                    await run_.attempt(f"latency-{rate:g}", round_no,
                                       functools.partial(_latency, ctx, system, rate), "p99_ms")
    finally:
        if system is not None:
            await ctx.shut_down(system, "system cases")
            await system.delete_names()


class EarlyNode:
    """The recovery case's node, booting in the background from the start of the run."""

    def __init__(self, ctx: Context) -> None:
        self.node: Node | None = None
        self.task: asyncio.Task[Node] | None = None
        self.problem: BaseException | None = None
        try:
            self.node = cases.recovery_node(ctx)
        except Exception as exc:  # told when the case runs (skipped, or failed under CI)
            self.problem = exc
            return
        self.task = asyncio.create_task(cases.start_node(ctx, self.node))
        self.used = False

    async def discard(self) -> None:
        """Destroy the node unless the case took it (and so destroys it itself)."""
        if self.node is None or self.task is None or self.used:
            return
        with contextlib.suppress(BaseException):
            await self.task
        await self.node.destroy()


async def _recovery(ctx: Context, early: EarlyNode | None) -> Figures:
    if early is None:
        node = cases.recovery_node(ctx)
        return await cases.recovery(ctx, node)
    if early.problem is not None:
        raise early.problem
    if early.node is None or early.task is None:
        raise RuntimeError("the recovery node was not prepared")
    early.used = True
    return await cases.recovery(ctx, early.node, early.task)


async def _system_batch(ctx: Context, system: System | None, how: str) -> Figures:
    if system is None:
        raise RuntimeError("the system did not start")
    if how == "direct":
        await cases.use_inprocess_order(system)
    else:
        await cases.use_order_process(system)
    return await cases.measure_batch(ctx, system, how, ctx.params.system_orders)


async def _latency(ctx: Context, system: System | None, rate: float) -> Figures:
    if system is None:
        raise RuntimeError("the system did not start")
    await cases.use_order_process(system)
    return await cases.latency(ctx, system, rate)


NOTES = {
    "timing": "time.monotonic (one clock for every process on Linux) for the baselines; "
              "epoch seconds for the system, where the subscribers' own timestamps are used.",
    "fanout": "publisher in the bench process, a window of publishes in flight; each of the "
              "three consumers a process of its own (raw aio-pika, pydantic, ack).",
    "consume": "one consumer process on a preloaded queue declared as the kit declares a "
               "subscriber's; msg/s from the first arrival to the last ack; FastStream with "
               "its per-message access log at WARNING, like the kit's services in the bench.",
    "system": "services as processes (LOG_LEVEL=WARNING, SQLite, defaults otherwise); "
              "orders/s from the first send to the last subscriber's effect stamp; CPU until "
              "the receipts and outcomes are back in the order service. On the direct path "
              "the order service runs in the bench process (its runner, without HTTP).",
    "latency": "open loop over HTTP; from the order's placed_at (stamped at the API's accept) "
               "to the latest effect stamp of the three subscribers (reservations.reserved_at, "
               "shipments.created_at, notifications.created_at), written in the delivery's "
               "transaction just before its commit.",
    "history": "an order database filled straight through SQL (answered orders, one in "
               "10,000 left unanswered); the store calls GET /system and GET /orders run, "
               "timed in the bench process on SQLite inline, as the service runs them.",
    "recovery": "on a throwaway node (scripts/rabbitmq-node): stop_app, an outage, start_app; "
                "a steady stream of orders over HTTP throughout.",
}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    params, args = parse(argv)
    console = Console(width=None if sys.stdout.isatty() else 140)
    problem = asyncio.run(_check_broker(params.amqp_url))
    if problem is not None:
        console.print(f"[red]RabbitMQ at {params.amqp_url.split('@')[-1]} does not answer[/red] "
                      f"({problem}). Start one (scripts/ensure-broker) or set AMQP_URL.")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="shop-bench-"))
    # SIGTERM (a CI deadline, `kill`) unwinds like Ctrl-C: every case's cleanup runs, so no
    # service process, consumer, queue or throwaway node is left behind.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = asyncio.run(run(params, console, tmp))
    finally:
        if args.keep_tmp:
            console.print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    render(console, result)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + ("-smoke" if params.smoke else "")
    path = write_json(result, args.out, stamp)
    console.print(f"figures written to {path}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
