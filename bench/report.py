"""Medians and ranges over the rounds, the goals as ratios within the run, a Rich table, JSON."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

Rounds = Mapping[str, Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    count: int

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "rounds": self.count}


def summarise(values: Sequence[float | None]) -> Summary | None:
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    return Summary(statistics.median(present), min(present), max(present), len(present))


def _flatten(figures: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            flat[name] = float(value)
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
    return flat


def summaries(rounds: Rounds) -> dict[str, dict[str, dict[str, float]]]:
    """Per case, per figure (nested ones as `a.b`): median, min, max over the rounds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for case, figures in rounds.items():
        flat = [_flatten(f) for f in figures]
        names = sorted({name for f in flat for name in f})
        out[case] = {}
        for name in names:
            summary = summarise([f.get(name) for f in flat])
            if summary is not None:
                out[case][name] = summary.as_dict()
    return out


@dataclass(frozen=True)
class Goal:
    name: str
    target: str
    values: Sequence[float | None]
    met: Callable[[float], bool]
    unit: str = ""

    def summary(self) -> Summary | None:
        return summarise(self.values)

    def verdict(self) -> str:
        summary = self.summary()
        if summary is None:
            return "not measured"
        return "met" if self.met(summary.median) else "missed"


def _paired(rounds: Rounds, top: str, bottom: str, figure_top: str, figure_bottom: str
            ) -> list[float | None]:
    """top/bottom per round (the cases alternate within a round, so each pair shares one)."""
    ratios: list[float | None] = []
    for a, b in zip(rounds.get(top, ()), rounds.get(bottom, ()), strict=False):
        x, y = a.get(figure_top), b.get(figure_bottom)
        ratios.append(x / y if x is not None and y else None)
    return ratios


def goals(rounds: Rounds) -> list[Goal]:
    def figure(case: str, name: str) -> list[float | None]:
        return [r.get(name) for r in rounds.get(case, ())]

    return [
        Goal("kit runner / raw aio-pika consume", ">= 0.8",
             _paired(rounds, "consume-kit", "consume-raw", "msg_per_s", "msg_per_s"),
             lambda v: v >= 0.8, "x"),
        Goal("kit runner / FastStream consume", ">= 2.0",
             _paired(rounds, "consume-kit", "consume-faststream", "msg_per_s", "msg_per_s"),
             lambda v: v >= 2.0, "x"),
        Goal("system, direct path / raw fanout", ">= 0.5",
             _paired(rounds, "system-direct", "fanout", "orders_per_s", "orders_per_s"),
             lambda v: v >= 0.5, "x"),
        Goal("system, HTTP API / raw fanout", ">= 0.5",
             _paired(rounds, "system-http", "fanout", "orders_per_s", "orders_per_s"),
             lambda v: v >= 0.5, "x"),
        Goal("p99 accept -> last commit at 100 orders/s", "<= 25 ms",
             figure("latency-100", "p99_ms"), lambda v: v <= 25, " ms"),
        Goal("throughput after growth / fresh system", ">= 0.9",
             figure("growth", "throughput_ratio"), lambda v: v >= 0.9, "x"),
        Goal("largest RSS after growth / at start", "<= 1.1",
             figure("growth", "worst_rss_ratio"), lambda v: v <= 1.1, "x"),
    ]


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _cell(summary: Summary | None, digits: int = 0, unit: str = "") -> str:
    if summary is None:
        return "-"
    if summary.count == 1:
        return f"{_fmt(summary.median, digits)}{unit}"
    return (f"{_fmt(summary.median, digits)}{unit} "
            f"[dim]({_fmt(summary.low, digits)}-{_fmt(summary.high, digits)})[/dim]")


#: (case, figure, label, digits) of the main table.
THROUGHPUT_ROWS = (
    ("fanout", "orders_per_s", "1. raw fanout: orders/s until 3 consumers have all", 0),
    ("fanout", "publish_confirmed_per_s", "   publish, confirmed (window)", 0),
    ("consume-raw", "msg_per_s", "2. raw aio-pika consume: msg/s", 0),
    ("consume-faststream", "msg_per_s", "   FastStream consume: msg/s", 0),
    ("consume-kit", "msg_per_s", "3. kit runner (no-op handler): msg/s to ack", 0),
    ("consume-kit", "msg_per_s_receipts_published", "   ... receipts published too", 0),
    ("consume-kit", "mean_batch", "   ... deliveries per transaction (mean)", 1),
    ("system-direct", "orders_per_s", "4a. system, publishing path: orders/s (3 effects)", 0),
    ("system-direct", "flow_back_per_s", "    ... receipts and outcomes back", 0),
    ("system-http", "orders_per_s", "4b. system, HTTP API: orders/s (3 effects)", 0),
    ("system-http", "flow_back_per_s", "    ... receipts and outcomes back", 0),
    ("system-http", "accepted_per_s", "    ... HTTP accepts/s", 0),
)


def render(console: Console, result: Mapping[str, Any]) -> None:
    rounds: Rounds = result["rounds"]
    stats = {case: {name: Summary(v["median"], v["min"], v["max"], int(v["rounds"]))
                    for name, v in figures.items()}
             for case, figures in result["summary"].items()}

    def get(case: str, name: str) -> Summary | None:
        return stats.get(case, {}).get(name)

    params = result["params"]
    title = (f"Throughput: median (min-max) of {params['rounds']} round(s); "
             f"prefetch {params['prefetch']}, publish window {params['window']}")
    table = Table()
    table.add_column("case")
    table.add_column("median (min-max)", justify="right")
    table.add_column("CPU s / 1,000", justify="right")
    rows = [row for row in THROUGHPUT_ROWS if row[0] in stats]
    for case, name, label, digits in rows:
        cpu = get(case, "system_cpu_s_per_1000") or get(case, "cpu_s_per_1000")
        show_cpu = name in ("orders_per_s", "msg_per_s")
        table.add_row(label, _cell(get(case, name), digits),
                      _cell(cpu, 2) if show_cpu and cpu else "")
    if rows:
        console.print(f"\n[bold]{title}[/bold]")
        console.print(table)

    cpu_cases = [c for c in ("system-direct", "system-http", "fanout") if c in stats]
    if cpu_cases:
        console.print("\n[bold]CPU seconds per 1,000 orders, by process: median "
                      "(min-max)[/bold]")
        cpu_table = Table()
        cpu_table.add_column("process")
        for case in cpu_cases:
            cpu_table.add_column(case, justify="right")
        names = sorted({n.split(".", 1)[1] for c in cpu_cases for n in stats[c]
                        if n.startswith("cpu_s_per_1000.")})
        for name in names:
            cpu_table.add_row(name, *(_cell(get(c, f"cpu_s_per_1000.{name}"), 2)
                                      for c in cpu_cases))
        console.print(cpu_table)

    loads = [c for c in stats if c.startswith("latency-")]
    if loads:
        console.print("\n[bold]Latency, open loop over HTTP: API accept (placed_at) -> last "
                      "subscriber's commit, ms: median of the rounds[/bold]")
        lat = Table()
        for column in ("offered/s", "sent/s", "accepted/s", "p50", "p95", "p99", "max",
                       "HTTP p99", "lost"):
            lat.add_column(column, justify="right")
        for case in sorted(loads, key=lambda c: float(c.split("-", 1)[1])):
            lat.add_row(case.split("-", 1)[1], _cell(get(case, "sent_per_s"), 0),
                        _cell(get(case, "accepted_per_s"), 0),
                        _cell(get(case, "p50_ms"), 1), _cell(get(case, "p95_ms"), 1),
                        _cell(get(case, "p99_ms"), 1), _cell(get(case, "max_ms"), 1),
                        _cell(get(case, "http_p99_ms"), 1), _cell(get(case, "lost"), 0))
        console.print(lat)

    once = Table()
    once.add_column("figure")
    once.add_column("value", justify="right")
    growth = next(iter(rounds.get("growth", ())), None)
    if growth:
        once.add_row(f"growth: orders/s, fresh system / after {growth['growth_orders']:,} "
                     f"orders (medians of {len(growth['pairs_orders_per_s'])} alternating)",
                     f"{growth['fresh_orders_per_s']:,.0f} / {growth['grown_orders_per_s']:,.0f}"
                     f" = {growth['throughput_ratio']:.2f}")
        once.add_row("growth: system CPU s per 1,000 orders, fresh / grown",
                     f"{growth['fresh_system_cpu_s_per_1000']:.1f} / "
                     f"{growth['grown_system_cpu_s_per_1000']:.1f}"
                     f" = {growth['cpu_ratio']:.2f}")
        once.add_row("growth: orders/s, same system at start / end (machine drift included)",
                     f"{growth['start_orders_per_s']:,.0f} / {growth['end_orders_per_s']:,.0f}"
                     f" = {growth['start_end_ratio']:.2f}")
        start_reads, end_reads = growth.get("reads_ms_start"), growth.get("reads_ms_end")
        if start_reads and end_reads:
            for key, what in (("system_first", "GET /system, first look (settles)"),
                              ("system_next", "GET /system, next look"),
                              ("late_orders", "GET /orders?late=true")):
                once.add_row(f"growth: {what}, ms at start / end",
                             f"{start_reads[key]:,.0f} / {end_reads[key]:,.0f}")
        for name, ratio in growth["rss_ratio"].items():
            once.add_row(f"growth: RSS of {name}, MB at start / end",
                         f"{growth['start_rss_mb'][name]:.0f} / "
                         f"{growth['end_rss_mb'][name]:.0f} = {ratio:.2f}")
    recovery = next(iter(rounds.get("recovery", ())), None)
    if recovery:
        once.add_row("recovery: broker down (stop_app issued -> start_app issued), s",
                     _fmt(recovery["outage_s"], 1))
        once.add_row("recovery: start_app -> first handled delivery, s",
                     _fmt(recovery["restart_to_first_handled_s"], 2))
        once.add_row(f"recovery: start_app -> all {recovery['orders_during_outage']} orders "
                     "placed in the outage handled, s",
                     _fmt(recovery["restart_to_outage_orders_handled_s"], 2))
        once.add_row("recovery: orders lost / duplicate rows (restart)",
                     f"{recovery['restart_lost']} / {recovery['restart_duplicate_rows']}")
        once.add_row(f"recovery: backlog of {recovery['backlog_messages']} after a subscriber "
                     "was down: start -> first handled, s",
                     _fmt(recovery["backlog_start_to_first_handled_s"], 2))
        once.add_row("recovery: backlog drain, msg/s", _fmt(recovery["backlog_drain_per_s"], 0))
    reads = next(iter(rounds.get("history", ())), None)
    if reads:
        once.add_row(f"history: late scan over {reads['orders']:,} orders, nothing settled "
                     "(every look before settling), ms", _fmt(reads["unsettled_scan_ms"], 1))
        once.add_row(f"history: first look, settling them in "
                     f"{reads['first_look_transactions']} transactions, ms (longest one)",
                     f"{reads['first_look_ms']:,.0f} "
                     f"({reads['first_look_longest_transaction_ms']:.0f})")
        once.add_row(f"history: every later look (GET /system's late orders: "
                     f"{reads['late_found']}), ms", _fmt(reads["look_ms"], 1))
        once.add_row("history: the latest 50 orders with their fan-out (GET /orders), ms",
                     _fmt(reads["latest_50_ms"], 1))
    if growth or recovery or reads:
        console.print("\n[bold]Growth, history and recovery (once per run)[/bold]")
        console.print(once)

    console.print("\n[bold]Goals: ratios within this run, paired per round, median "
                  "(min-max)[/bold]")
    goal_table = Table()
    for column in ("goal", "target", "measured", "verdict"):
        goal_table.add_column(column)
    for goal in result["goals"]:
        summary = summarise(goal["values"])
        verdict = goal["verdict"]
        colour = {"met": "green", "missed": "red"}.get(verdict, "yellow")
        goal_table.add_row(goal["name"], goal["target"], _cell(summary, 2, goal["unit"]),
                           f"[{colour}]{verdict}[/{colour}]")
    console.print(goal_table)

    for stop in result.get("slow_stops", ()):
        console.print(f"[yellow]SLOW STOP[/yellow] {stop['service']} ({stop['where']}): "
                      f"{stop['seconds']} s from SIGTERM to exit"
                      f"{', killed' if stop['killed'] else ''}")
    for skipped in result.get("skipped", ()):
        console.print(f"[yellow]SKIPPED[/yellow] {skipped['case']}: {skipped['reason']}")
    for error in result["errors"]:
        console.print(f"[red]FAILED[/red] {error['case']} (round {error['round']}): "
                      f"{error['error']}")


def goal_records(rounds: Rounds) -> list[dict[str, Any]]:
    records = []
    for goal in goals(rounds):
        summary = goal.summary()
        records.append({"name": goal.name, "target": goal.target, "unit": goal.unit,
                        "values": list(goal.values), "verdict": goal.verdict(),
                        **({"summary": summary.as_dict()} if summary else {})})
    return records


def write_json(result: Mapping[str, Any], folder: Path, stamp: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
