"""Running the whole system for an e2e test: `shop up` in a subprocess, polling with a deadline."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from common.ops.observe import sweep_prefix

SUBSCRIBERS = {"inventory", "logistics", "seller"}
SERVICES = ("order", *sorted(SUBSCRIBERS))
#: How the tests run `shop`: this Python, the repository's code.
SHOP = (sys.executable, "-m", "common.ops.cli")


def ctrl_c_reaches_it() -> None:
    """`preexec_fn` for a command the test stops with SIGINT, as Ctrl-C would: a test run
    started in the background without job control inherits SIGINT ignored, and Python then
    never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class System:
    """`shop up` in a subprocess, with its own prefix, data folder and HTTP port."""

    def __init__(self, env: dict[str, str], proc: subprocess.Popen[str], log: Path,
                 command: Sequence[str] = SHOP, cwd: Path | None = None) -> None:
        self.env = env
        self.proc = proc
        self.log = log
        self.api = env["SHOP_API_URL"]
        self.command = list(command)
        self.cwd = cwd

    def shop(self, *args: str, stdin: str | None = None, timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.command, *args], env=self.env, cwd=self.cwd, input=stdin,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def service_pid(self, service: str) -> int:
        """The process id of one service that `shop up` started (`python -m common.kit NAME`)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if argv[-3:-1] == [b"common.kit", service.encode()]:
                    return int(pid)
        raise AssertionError(f"shop up runs no {service} service process")


def poll(probe: Any, *, timeout: float, what: str) -> Any:
    """Call `probe` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)  # polling interval under a deadline, not a fixed wait
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


@contextlib.contextmanager
def run_system(tmp: Path, amqp_url: str, management_url: str, *, name: str = "e2e",
               ready_timeout: float = 60, env: Mapping[str, str | None] | None = None,
               shop: Sequence[str] = SHOP, cwd: Path | None = None,
               subscribers: Collection[str] = SUBSCRIBERS) -> Iterator[System]:
    """`shop up` under a unique name prefix, on free ports, with its data in `tmp`; `env`
    overrides its environment (None: unset); `shop` and `cwd`: another checkout's command
    and where to run it.

    Yields once the `subscribers` have announced themselves; afterwards stops it with
    SIGTERM and deletes every queue and exchange under its prefix.
    """
    port = free_port()
    prefix = f"{name}{os.getpid()}{port}."
    environment = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "RABBITMQ_MANAGEMENT_URL": management_url,
        "SHOP_NAME_PREFIX": prefix,
        "SHOP_DATA_DIR": str(tmp / "data"),
        "ORDER_HTTP_PORT": str(port),
        "SHOP_API_URL": f"http://127.0.0.1:{port}",
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        # Operator actions (retiring a subscriber) are off without it; the `shop` commands
        # run with the same environment, so they send it.
        "SHOP_OPERATOR_TOKEN": secrets.token_urlsafe(24),
        # Free ports for /metrics too, so a system already running here does not clash.
        **{f"{service.upper()}_METRICS_PORT": str(free_port())
           for service in {*SERVICES, *subscribers}},
    }
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    log = tmp / "shop-up.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*shop, "up"], env=environment, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    system = System(environment, proc, log, shop, cwd)

    def registry() -> bool:
        assert proc.poll() is None, f"shop up exited early:\n{system.logs()}"
        try:
            response = httpx.get(f"{system.api}/subscribers", timeout=2)
        except httpx.HTTPError:
            return False
        names = {s["name"] for s in response.json()} if response.status_code == 200 else set()
        return names >= set(subscribers)

    try:
        poll(registry, timeout=ready_timeout, what=f"{', '.join(sorted(subscribers))} to "
                                                   "announce themselves")
        yield system
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            sweep_prefix(management_url, prefix)
