"""`shop new subscriber loyalty --on OrderPlaced` in a fresh clone of the repository: only
new files and added lines, the tests it writes pass, `shop up` runs five services, orders
expect loyalty until it is retired and stopped.

The clone is of the current commit (what is not committed is not in it). It gets a
virtualenv of its own that sees this one's packages through a .pth file, but not this
checkout's editable install, so registering the clone's entry points there (which the
command does) leaves this virtualenv as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.support import SUBSCRIBERS, poll, run_system

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ADDRESS = ["--name", "Ada", "--street", "1 Row", "--city", "Berlin", "--postal-code", "10115",
           "--country", "DE"]
WRITTEN = {"loyalty_service/__init__.py", "loyalty_service/__main__.py",
           "loyalty_service/service.py", "loyalty_service/store.py",
           "tests/unit/test_loyalty.py", "tests/integration/test_loyalty.py"}
EDITED = {"pyproject.toml", "docker-compose.yml", "deploy/prometheus.yml"}


@dataclass(frozen=True)
class Clone:
    """A clone of the repository and the Python of its own virtualenv."""

    repo: Path
    python: Path
    bin: Path

    def run(self, *command: str | Path, env: dict[str, str] | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(c) for c in command], cwd=self.repo, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Clone:
    """A fresh clone at this checkout's commit, with a virtualenv that sees this one's
    packages (a .pth file) but not its install of this checkout."""
    try:
        commit = git("rev-parse", "HEAD").strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("the repository is not a git checkout here: nothing to clone")
    tmp = tmp_path_factory.mktemp("clone")
    repo, venv = tmp / "repo", tmp / "venv"
    git("clone", "--quiet", "--no-checkout", str(ROOT), str(repo))
    git("checkout", "--quiet", commit, cwd=repo)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                           "'purelib'))"], capture_output=True, text=True, check=True)
    (Path(site.stdout.strip()) / "outer-venv.pth").write_text(sysconfig.get_path("purelib"))
    return Clone(repo, python, venv / "bin")


@pytest.fixture(scope="module")
def generated(clone: Clone, amqp_url: str, management_url: str) -> dict[str, str]:
    """The command run in the clone; the environment the clone's commands take."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env |= {"PATH": f"{clone.bin}:{env.get('PATH', '/usr/bin:/bin')}", "AMQP_URL": amqp_url,
            "RABBITMQ_MANAGEMENT_URL": management_url}
    # The broker's queues are looked at under a prefix of this run's own.
    prefix = f"newsub{os.getpid()}."
    result = clone.run(clone.python, "-m", "common.ops.cli", "new", "subscriber", "loyalty",
                       "--on", "OrderPlaced", env={**env, "SHOP_NAME_PREFIX": prefix})
    assert result.returncode == 0, result.stderr + result.stdout
    assert "registered" in result.stdout, result.stdout
    return env


def test_only_new_files_and_added_lines(clone: Clone, generated: dict[str, str]) -> None:
    """`git status` shows the package and its two tests as new, and pyproject.toml,
    docker-compose.yml and deploy/prometheus.yml modified with lines added only."""
    status = git("status", "--porcelain", "--untracked-files=all", cwd=clone.repo).splitlines()
    assert {line[3:] for line in status if line.startswith("?? ")} == WRITTEN
    assert {line[3:] for line in status if line.startswith(" M ")} == EDITED
    assert len(status) == len(WRITTEN) + len(EDITED), status
    for line in git("diff", "--numstat", cwd=clone.repo).splitlines():
        added, removed, path = line.split("\t")
        assert (int(added) > 0, removed) == (True, "0"), f"{path}: {line}"


def test_the_written_tests_and_the_compose_checks_pass_and_lint_is_clean(
        clone: Clone, generated: dict[str, str]) -> None:
    """In the clone, the written unit and integration tests pass, the compose file with the
    new service passes tests/unit/test_compose.py, and ruff and mypy --strict find nothing
    in what was written."""
    tests = clone.run(clone.python, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                      "tests/unit/test_loyalty.py", "tests/integration/test_loyalty.py",
                      "tests/unit/test_compose.py", env=generated)
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
    for test in ("unit/test_loyalty.py::test_on_order_placed_records_the_event_it_receives",
                 "integration/test_loyalty.py::test_an_event_published_to_its_exchange_"
                 "reaches_its_handler_once[OrderPlaced]",
                 "unit/test_compose.py::test_each_service_connects_as_its_own_broker_user"
                 "[loyalty]"):
        assert f"{test} PASSED" in tests.stdout, tests.stdout[-5000:]
    written = sorted(WRITTEN)
    ruff = clone.run(Path(sys.executable).parent / "ruff", "check", "--no-cache", *written)
    assert ruff.returncode == 0, ruff.stdout
    mypy = clone.run(clone.python, "-m", "mypy", "--cache-dir",
                     clone.repo.parent / "mypy-cache", *written, env=generated)
    assert mypy.returncode == 0, mypy.stdout


def status_of(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert result.returncode == 0, result.stderr + result.stdout
    return {s["name"]: s["status"] for s in json.loads(result.stdout)["subscribers"]}


def test_shop_up_runs_it_and_orders_expect_it_until_it_is_retired_and_stopped(
        clone: Clone, generated: dict[str, str], tmp_path: Path, amqp_url: str,
        management_url: str) -> None:
    """`shop up` runs five services; an order shows loyalty handled and `shop doctor` checks
    its queue; after `shop order retire loyalty --force` and stopping it (`shop up` then
    stops the others), a new order placed with the order service does not expect it."""
    with run_system(tmp_path, amqp_url, management_url, name="newsub", env=generated,
                    shop=[str(clone.bin / "shop")], cwd=clone.repo,
                    subscribers={*SUBSCRIBERS, "loyalty"}) as system:
        services = {name: system.service_pid(name)
                    for name in ("order", *SUBSCRIBERS, "loyalty")}
        assert len(services) == 5
        placed = system.shop("order", "place", "--customer", "c-1", "--item",
                             "SKU-BOOK-1:1:12.50:seller-books", *ADDRESS)
        first = placed.stdout.strip().splitlines()[-1]
        assert status_of(system.shop("order", "status", first, "--wait", "30", "--json")) == {
            **dict.fromkeys(SUBSCRIBERS, "handled"), "loyalty": "handled"}

        queue = f"{system.env['SHOP_NAME_PREFIX']}loyalty.order.placed"

        def checks_loyalty() -> dict[str, Any] | None:
            found = json.loads(system.shop("doctor", "--json").stdout)
            queues = {q["queue"]: q for s in found["report"]["subscribers"]
                      if s["name"] == "loyalty" for q in s["queues"]}
            consumed = next(c for c in found["checks"] if "has a consumer" in c["name"])
            ok = queue in queues and queues[queue]["consumers"] and consumed["status"] == "ok"
            return found if ok else None

        poll(checks_loyalty, timeout=30, what=f"shop doctor to check {queue}")

        retired = system.shop("order", "retire", "loyalty", "--force")
        assert retired.returncode == 0, retired.stderr
        os.kill(services["loyalty"], signal.SIGTERM)
        assert system.proc.wait(timeout=30) == 1, "shop up stops the others when one stops"
        order = subprocess.Popen([str(clone.bin / "shop"), "run", "order"], env=system.env,
                                 cwd=clone.repo, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            def healthy() -> bool:
                try:
                    return httpx.get(f"{system.api}/healthz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            poll(healthy, timeout=30, what="the order service alone to answer")
            placed = system.shop("order", "place", "--customer", "c-2", "--item",
                                 "SKU-BOOK-1:1:12.50:seller-books", *ADDRESS)
            second = placed.stdout.strip().splitlines()[-1]
            assert set(status_of(system.shop("order", "status", second, "--json"))) == SUBSCRIBERS
            assert status_of(system.shop("order", "status", first, "--json"))["loyalty"] == (
                "handled")
        finally:
            order.send_signal(signal.SIGTERM)
            order.wait(timeout=30)
