"""Fixtures of the fault suite: the throwaway RabbitMQ node, the system as processes, the ledger.

The node is started once per session with scripts/rabbitmq-node and stopped (its folder
deleted) at the end, whatever happened; after every test whatever the test broke on it (app
stopped, memory watermark lowered) is restored. The machine's main broker is never used.
Each test's ledger line is printed in a "fault ledger" section at the end of the run.
"""

from __future__ import annotations

import os
import pwd
import shutil
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from bench.node import NodeError
from common.ops.observe import sweep_prefix
from tests.faults.support import (
    STOP_TIMEOUT,
    Ledger,
    LedgerLine,
    Node,
    Report,
    Shop,
    node_port,
)

LEDGER = pytest.StashKey[list[LedgerLine]]()
#: Services that did not stop in time on SIGTERM, per test.
UNSTOPPED = pytest.StashKey[list[str]]()
FAILED = pytest.StashKey[bool]()
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
#: The suite's nodes are NODE_PREFIX + the pid of the pytest process that owns them.
NODE_PREFIX = "shopfaults"


def stop_abandoned_nodes() -> None:
    """Stop the nodes of earlier sessions that died without stopping theirs (killed).

    A node is named after the pytest process that started it; one whose process is gone
    is nobody's any more. A live process (even an unrelated one with a reused pid) keeps
    its node: better a stray node than someone else's broken run.
    """
    # Where scripts/rabbitmq-node puts them: a folder the rabbitmq user can reach.
    base = os.environ.get("RABBITMQ_NODE_TMP") or "/tmp"  # noqa: S108 - the script's default
    for folder in Path(base).glob(f"shop-rabbitmq-{NODE_PREFIX}*"):
        owner = folder.name.removeprefix(f"shop-rabbitmq-{NODE_PREFIX}")
        if not owner.isdigit() or Path(f"/proc/{owner}").exists():
            continue
        Node(f"{NODE_PREFIX}{owner}", 0).destroy()


def _cannot_run(reason: str) -> None:
    """Skip the suite with `reason`, or fail it when running in CI, where it must run."""
    message = f"fault suite: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so the fault suite must run)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def node() -> Iterator[Node]:
    """A throwaway RabbitMQ node of our own, for faults that stop or starve a broker."""
    if shutil.which("rabbitmq-server") is None and not SERVER.exists():
        _cannot_run("rabbitmq-server is not installed, and the suite runs its own throwaway "
                    "node (Debian: apt-get install rabbitmq-server)")
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != "rabbitmq":
        _cannot_run("starting a throwaway RabbitMQ node needs root or the rabbitmq user")
    stop_abandoned_nodes()
    broker = Node(f"{NODE_PREFIX}{os.getpid()}", node_port())
    try:
        broker.start()
    except (NodeError, OSError) as exc:
        broker.destroy()
        _cannot_run(f"the throwaway RabbitMQ node did not start: {exc}")
    try:
        yield broker
    finally:
        try:
            broker.restore()
        finally:
            broker.destroy()


@pytest.fixture
async def shop(node: Node, tmp_path: Path, request: pytest.FixtureRequest
               ) -> AsyncIterator[Shop]:
    """The system under test, not started yet: a prefix, a data folder, seeded stock.

    Afterwards every process is stopped, the node restored and the prefix swept; when the
    test failed, the tail of each service's log is printed.
    """
    system = Shop(node, tmp_path, f"f{uuid.uuid4().hex[:8]}.")
    await system.seed_stock()
    try:
        yield system
    finally:
        try:
            # The broker first: a test that failed with the app stopped must not leave the
            # services to shut down without one.
            node.restore()
        finally:
            system.shutdown()
            if system.unstopped:
                request.config.stash.setdefault(UNSTOPPED, []).append(
                    f"{request.node.name}: {', '.join(system.unstopped)} did not stop within "
                    f"{STOP_TIMEOUT:.0f} s of SIGTERM; killed")
            sweep_prefix(node.management_url, system.prefix)
            if request.node.stash.get(FAILED, False):
                print(system.all_logs())  # shown with the failure's report


@pytest.fixture
def report(request: pytest.FixtureRequest, shop: Shop, node: Node) -> Report:
    """Record this test's ledger line for the summary at the end of the run."""

    async def record(*, recovery_s: float | None = None, note: str = "",
                     ledger: Ledger | None = None, sent: int | None = None) -> LedgerLine:
        ledger = ledger or shop.ledger()
        line = LedgerLine(test=request.node.name,
                          sent=shop.placement.sent if sent is None else sent,
                          accepted=ledger.accepted, lost=ledger.lost,
                          duplicates=ledger.duplicates, redeliveries=ledger.redeliveries,
                          broker_redeliveries=await node.redelivered(shop.prefix),
                          recovery_s=recovery_s, note=note)
        request.config.stash.setdefault(LEDGER, []).append(line)
        return line

    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember a failure, so the `shop` fixture prints the services' logs with it."""
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    lines = config.stash.get(LEDGER, [])
    unstopped = config.stash.get(UNSTOPPED, [])
    if not lines and not unstopped:
        return
    terminalreporter.section("fault ledger")
    for line in lines:
        terminalreporter.write_line(line.render())
    for warning in unstopped:
        terminalreporter.write_line(f"warning: {warning}", yellow=True)
