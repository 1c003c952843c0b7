"""Watching the whole system as a user runs it: `shop doctor` on `shop up`, and the live
`shop queues --watch` in a real terminal (a pseudo-terminal), left with Ctrl-C."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import System, ctrl_c_reaches_it, poll, run_system

pytestmark = pytest.mark.e2e

#: Rich hides the cursor while a Live view runs and shows it again on its way out.
HIDE_CURSOR = b"\x1b[?25l"
SHOW_CURSOR = b"\x1b[?25h"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, amqp_url: str,
           management_url: str) -> Iterator[System]:
    with run_system(tmp_path_factory.mktemp("watching"), amqp_url, management_url,
                    name="watch") as system:
        yield system


def test_doctor_finds_a_running_system_healthy(system: System) -> None:
    """Every check of `shop doctor` passes on a system just started with `shop up`: exit 0."""

    def healthy() -> dict[str, object] | None:
        result = system.shop("doctor", "--json")
        diagnosis: dict[str, object] = json.loads(result.stdout)
        return diagnosis if result.returncode == 0 else None

    diagnosis = poll(healthy, timeout=30, what="shop doctor to find the system healthy")
    checks = diagnosis["checks"]
    assert isinstance(checks, list)
    assert {c["status"] for c in checks} == {"ok"}, checks
    assert len(checks) == 8
    text = system.shop("doctor")
    assert text.returncode == 0
    assert "✗" not in text.stdout
    assert "✓ no late orders" in text.stdout


def test_queues_watch_runs_in_a_terminal_and_ctrl_c_restores_it(system: System,
                                                                 tmp_path: Path) -> None:
    """The live view draws the system's queues in a terminal; Ctrl-C leaves with status 0,
    the cursor shown again and no traceback; --svg keeps the last view as a picture."""
    picture = tmp_path / "watch.svg"
    parent, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.ops.cli", "queues", "--watch", "--interval", "0.3",
         "--svg", str(picture)],
        env={**system.env, "COLUMNS": "160", "LINES": "60", "TERM": "xterm-256color"},
        stdin=child, stdout=child, stderr=child, close_fds=True,
        preexec_fn=ctrl_c_reaches_it)
    os.close(child)
    screen = b""
    try:
        queue = f"{system.env['SHOP_NAME_PREFIX']}inventory.order.placed".encode()
        deadline = time.monotonic() + 20
        while (queue not in screen or not picture.exists()) and time.monotonic() < deadline:
            readable, _, _ = select.select([parent], [], [], 0.2)
            if readable:
                screen += os.read(parent, 65536)
        assert queue in screen, screen[-2000:]
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=15)
        while True:  # what it wrote on its way out
            readable, _, _ = select.select([parent], [], [], 0.2)
            if not readable:
                break
            try:
                chunk = os.read(parent, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            screen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(parent)
    assert code == 0
    assert b"Traceback" not in screen
    assert HIDE_CURSOR in screen  # it was a live view ...
    assert screen.rfind(SHOW_CURSOR) > screen.rfind(HIDE_CURSOR)  # ... and the cursor is back
    assert queue.decode() in picture.read_text()
