"""The benchmark's arithmetic and /proc readings: percentiles, medians, paired goals, CPU, RSS."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from bench.cases import per_thousand, percentile
from bench.procfs import cpu_seconds, listener_pid, rss_bytes
from bench.report import goals, summaries, summarise

pytestmark = pytest.mark.unit


def test_percentiles_are_nearest_rank() -> None:
    """p50 and p99 of 1..100 are 50 and 99; a single value is every percentile; none is None."""
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 0.50) == 50
    assert percentile(values, 0.99) == 99
    assert percentile([7.0], 0.99) == 7
    assert percentile([], 0.5) is None


def test_rounds_are_summarised_as_median_and_range_including_nested_figures() -> None:
    """Each figure, nested ones as `a.b`, gets median, min and max over the rounds; rounds
    that lack a figure are left out of it."""
    rounds: dict[str, list[dict[str, Any]]] = {"case": [{"rate": 10.0, "cpu": {"order": 1.0}},
                                                        {"rate": 30.0, "cpu": {"order": 3.0}},
                                                        {"rate": 20.0}]}
    summary = summaries(rounds)["case"]
    assert summary["rate"] == {"median": 20.0, "min": 10.0, "max": 30.0, "rounds": 3}
    assert summary["cpu.order"] == {"median": 2.0, "min": 1.0, "max": 3.0, "rounds": 2}
    assert summarise([None, None]) is None


def test_goals_pair_the_cases_of_one_round() -> None:
    """A ratio goal divides figures of the same round, then takes the median of the ratios."""
    rounds = {"consume-kit": [{"msg_per_s": 90.0}, {"msg_per_s": 40.0}],
              "consume-raw": [{"msg_per_s": 100.0}, {"msg_per_s": 50.0}]}
    kit_vs_raw = next(g for g in goals(rounds) if g.name.startswith("kit runner / raw"))
    assert kit_vs_raw.values == [0.9, 0.8]
    assert kit_vs_raw.verdict() == "met"
    latency = next(g for g in goals(rounds) if g.name.startswith("p99"))
    assert latency.verdict() == "not measured"


def test_cpu_per_thousand_orders_is_the_difference_scaled() -> None:
    """Two CPU readings and a count give seconds per 1,000; a process read only once is left out."""
    assert per_thousand({"order": 1.0, "gone": 1.0}, {"order": 3.0, "new": 2.0}, 500) == {
        "order": 4.0}


def test_proc_readings_of_this_process() -> None:
    """CPU seconds and RSS come from /proc for a live process, None for one that is gone."""
    assert (cpu_seconds(os.getpid()) or 0) > 0
    assert (rss_bytes(os.getpid()) or 0) > 1_000_000
    assert cpu_seconds(2**22 + 1) is None  # above the default pid_max: never a process
    assert rss_bytes(2**22 + 1) is None


def test_the_process_listening_on_a_port_is_found() -> None:
    """The broker's process is found as the one that listens on its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert listener_pid(sock.getsockname()[1]) == os.getpid()
