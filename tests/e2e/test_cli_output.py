"""What the `shop` commands write where: stdout carries only a command's result (every
`--json` parses, every time), log lines go to stderr, and `shop up` on a pipe writes plain
lines without colour codes or a false outage."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from yarl import URL

from tests.e2e.support import (
    SERVICES,
    SUBSCRIBERS,
    System,
    ctrl_c_reaches_it,
    free_port,
    poll,
    run_system,
)

pytestmark = pytest.mark.e2e

#: Runs of each `--json` command; more for those that open an AMQP connection, where a
#: closed connection was once logged as an outage on stdout in some runs only.
RUNS = 2
AMQP_RUNS = 5
SKU = "SKU-JSON-1"
PLACE = ("order", "place", "--customer", "cust-json", "--item", f"{SKU}:1:2.50:seller-json",
         "--name", "Ada", "--street", "1 Row", "--city", "Berlin", "--postal-code", "10115",
         "--country", "DE", "--json")
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, amqp_url: str,
           management_url: str) -> Iterator[System]:
    with run_system(tmp_path_factory.mktemp("cli-output"), amqp_url, management_url,
                    name="json") as system:
        yield system


def parsed(result: subprocess.CompletedProcess[str], what: str) -> Any:
    """stdout as one JSON document, or a failure that shows what else was printed."""
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"`shop {what}` printed more than JSON ({exc}); exit "
                             f"{result.returncode}\nstdout:\n{result.stdout[:2000]}\n"
                             f"stderr:\n{result.stderr[-2000:]}") from None


def dead_letter(system: System, management_url: str) -> str:
    """A message inventory cannot read, published to its queue: dead-lettered at once.
    Returns its id once `shop dlq list` sees it."""
    message_id = str(uuid.uuid4())
    parts = urlsplit(management_url)
    published = httpx.post(
        f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}/api/exchanges/"
        f"{quote('/', safe='')}/amq.default/publish",
        auth=(parts.username or "guest", parts.password or "guest"), timeout=10,
        json={"routing_key": f"{system.env['SHOP_NAME_PREFIX']}inventory.order.placed",
              "properties": {"message_id": message_id, "delivery_mode": 2},
              "payload": "not json [/x]", "payload_encoding": "string"})
    assert published.json() == {"routed": True}, published.text

    def listed() -> bool:
        result = system.shop("dlq", "list", "inventory", "--json")
        return result.returncode == 0 and message_id in result.stdout

    poll(listed, timeout=30, what="the unreadable message to be dead-lettered")
    return message_id


def test_every_json_command_prints_only_json_every_time(system: System,
                                                        management_url: str) -> None:
    """Each `--json` command of `shop --help` and its groups, run repeatedly and several at
    once against a running system: stdout is one JSON document every time (log lines, such
    as a connection closed, go to stderr)."""
    placed = system.shop(*PLACE)
    assert placed.returncode == 0, placed.stderr
    order_id = str(parsed(placed, "order place --json")["order_id"])
    done = system.shop("order", "status", order_id, "--wait", "30", "--json")
    assert done.returncode == 0, done.stderr + done.stdout
    message_id = dead_letter(system, management_url)

    commands = [
        *[PLACE] * RUNS,
        *[("order", "status", order_id, "--json")] * RUNS,
        *[("order", "trace", order_id, "--json")] * RUNS,
        *[("order", "list", "--json")] * RUNS,
        *[("order", "subscribers", "--json")] * RUNS,
        *[("inventory", "stock", "set", SKU, "100", "--json")] * RUNS,
        *[("inventory", "stock", "list", "--json")] * RUNS,
        *[("logistics", "shipments", "list", "--json")] * RUNS,
        *[("logistics", "shipments", "show", order_id, "--json")] * RUNS,
        *[("seller", "inbox", "seller-json", "--json")] * RUNS,
        *[("queues", "--json")] * AMQP_RUNS,
        *[("doctor", "--json")] * AMQP_RUNS,  # exits 1: a dead letter waits
        *[("dlq", "list", "inventory", "--json")] * AMQP_RUNS,
        *[("dlq", "show", message_id, "--json")] * AMQP_RUNS,
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda args: (args, system.shop(*args)), commands))
    for args, result in results:
        what = " ".join(args)
        assert result.returncode == (1 if args[0] == "doctor" else 0), \
            f"shop {what}: exit {result.returncode}\n{result.stderr[-2000:]}"
        parsed(result, what)

    # Last, as it takes the subscribers out of the registry: once per subscriber.
    for name in sorted(SUBSCRIBERS):
        retired = system.shop("order", "retire", name, "--force", "--json")
        assert retired.returncode == 0, retired.stderr
        assert parsed(retired, f"order retire {name} --json")["name"] == name


def test_queues_watch_json_prints_one_json_object_per_refresh(system: System) -> None:
    """`shop queues --watch --json` on a pipe, with the broker's AMQP port away (it tries to
    connect before every refresh, and logs that it waits): every line on stdout is one JSON
    object, the waits are on stderr."""
    env = {**system.env, "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.ops.cli", "queues", "--watch", "--json", "--interval",
         "0.2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=ctrl_c_reaches_it)
    assert proc.stdout is not None
    out = b""
    try:
        deadline = time.monotonic() + 30
        while out.count(b"\n") < 2 and time.monotonic() < deadline:
            readable, _, _ = select.select([proc.stdout], [], [], 0.2)
            if readable:
                out += os.read(proc.stdout.fileno(), 65536)
        proc.send_signal(signal.SIGINT)
        rest, errors = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = (out + rest).decode().splitlines()
    assert len(lines) >= 2, errors.decode()[-2000:]
    for line in lines:
        assert json.loads(line)["source"] == "management API"
    assert "waiting for the broker" in errors.decode()


def test_doctor_json_stays_json_while_it_waits_for_a_broker_that_is_not_there(
        system: System) -> None:
    """With the broker away, `shop doctor --json` logs its wait for it on stderr and still
    prints only its JSON verdict on stdout."""
    env = {**system.env, "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}
    result = subprocess.run([sys.executable, "-m", "common.ops.cli", "doctor", "--json"], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    verdict = parsed(result, "doctor --json")
    assert isinstance(verdict, dict)
    assert verdict["checks"][0]["status"] == "failed"
    assert "waiting for the broker" in result.stderr


def test_shop_up_on_a_pipe_writes_plain_lines_and_no_false_outage(
        tmp_path: Path, amqp_url: str, management_url: str) -> None:
    """`shop up` started and stopped cleanly with its output in a file, no LOG_FORMAT set:
    no colour codes, each service's lines `name | {JSON}`, and no connection reported lost
    (neither its own broker check at start nor the services' at their clean stop)."""
    with run_system(tmp_path, amqp_url, management_url, name="pipe",
                    env={"LOG_FORMAT": None}) as system:
        pass
    assert system.proc.returncode == 0
    text = system.log.read_text(errors="replace")
    assert not ANSI.search(text), text[-3000:]
    assert "broker connection lost" not in text, text[-3000:]
    prefixed = [line.partition(" | ") for line in text.splitlines() if " | " in line]
    assert {name.strip() for name, _, _ in prefixed} == set(SERVICES)
    for name, _, line in prefixed:
        assert json.loads(line)["service"] == name.strip()
    assert "all services stopped" in text


def test_broker_setup_json_prints_only_json(system: System, amqp_url: str,
                                            management_url: str) -> None:
    """`shop broker setup --json`, run as an administrator of its own (made for the test, so
    the broker's own stays as it is): one JSON document naming each service's user and its
    grant, twice in a row (it is idempotent); the users are removed afterwards."""
    parts = urlsplit(management_url)
    api = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}/api"
    auth = (parts.username or "guest", parts.password or "guest")
    prefix = system.env["SHOP_NAME_PREFIX"]
    admin, password = f"{prefix}admin", uuid.uuid4().hex
    vhost = quote("/", safe="")
    with httpx.Client(auth=auth, timeout=10) as client:
        client.put(f"{api}/users/{quote(admin, safe='')}",
                   json={"password": password, "tags": "administrator"}).raise_for_status()
        client.put(f"{api}/permissions/{vhost}/{quote(admin, safe='')}",
                   json={"configure": ".*", "write": ".*", "read": ".*"}).raise_for_status()
        try:
            env = {**system.env,
                   "AMQP_URL": str(URL(amqp_url).with_user(admin).with_password(password)),
                   "RABBITMQ_MANAGEMENT_URL": str(URL(management_url).with_user(admin)
                                                  .with_password(password)),
                   **{f"{name.upper()}_BROKER_PASSWORD": uuid.uuid4().hex for name in SERVICES}}
            for _ in range(2):
                result = subprocess.run([sys.executable, "-m", "common.ops.cli", "broker", "setup",
                                         "--json"], env=env, capture_output=True, text=True,
                                        timeout=60, check=False)
                assert result.returncode == 0, result.stderr[-2000:]
                report = parsed(result, "broker setup --json")
                assert {u["user"] for u in report["users"]} == {prefix + s for s in SERVICES}
        finally:
            for user in (admin, *(prefix + s for s in SERVICES)):
                client.delete(f"{api}/users/{quote(user, safe='')}")
