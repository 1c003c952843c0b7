"""`shop new subscriber`: what it writes, the lines it adds, and what it refuses (writing
nothing), in a temporary copy of the repository's files."""

from __future__ import annotations

import difflib
import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from common.events import EVENT_TYPES, KIT_EVENTS, Event
from common.kit import discovery
from common.kit.declare import Service
from common.ops import scaffold, scaffold_cli
from common.ops.scaffold import RefusedError
from tests.factories import make_event

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EDITED = ("pyproject.toml", "docker-compose.yml", "deploy/prometheus.yml")
BUSINESS = sorted(cls.__name__ for cls in EVENT_TYPES.values() if cls not in KIT_EVENTS)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The files the command reads and edits, copied, as the working directory; the broker
    answers with no queue."""
    for path in (*EDITED, "scripts/new-env"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, tmp_path / path)
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    (tmp_path / "tests" / "integration").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(scaffold_cli, "broker_queues_of", lambda settings: [])
    return tmp_path


def files_in(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def new(*args: str) -> Result:
    """`shop new subscriber ARGS --no-install`."""
    return CliRunner().invoke(scaffold_cli.app, ["subscriber", *args, "--no-install"])


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    """(lines removed or changed, lines added) from `before` to `after`."""
    diff = list(difflib.ndiff(before.splitlines(keepends=True), after.splitlines(keepends=True)))
    return ([d[2:] for d in diff if d.startswith("- ")],
            [d[2:] for d in diff if d.startswith("+ ")])


@pytest.fixture
def imported(repo: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Import a module written in the copy; forgotten afterwards."""
    monkeypatch.syspath_prepend(str(repo))
    known = set(sys.modules)
    yield importlib.import_module
    for name in set(sys.modules) - known:
        del sys.modules[name]


# --- what it writes ---------------------------------------------------------------------------

def test_it_writes_the_package_and_its_tests_and_only_adds_lines_to_three_files(
        repo: Path) -> None:
    """The package (service, store, __main__, __init__) and two tests are new; pyproject.toml,
    docker-compose.yml and deploy/prometheus.yml only gain lines, the service's own."""
    before = files_in(repo)
    result = new("loyalty", "--on", "OrderPlaced")
    assert result.exit_code == 0, result.output
    after = files_in(repo)
    assert sorted(set(after) - set(before)) == [
        "loyalty_service/__init__.py", "loyalty_service/__main__.py",
        "loyalty_service/service.py", "loyalty_service/store.py",
        "tests/integration/test_loyalty.py", "tests/unit/test_loyalty.py"]
    assert {p for p in before if before[p] != after[p]} == set(EDITED)
    added = {}
    for path in EDITED:
        removed, added[path] = changed_lines(before[path].decode(), after[path].decode())
        assert removed == [], f"{path}: lines changed or removed: {removed}"
    assert added["pyproject.toml"] == ['loyalty = "loyalty_service.service:service"\n']
    assert all("loyalty" in line.lower() for line in added["deploy/prometheus.yml"])
    assert sum("LOYALTY_BROKER_PASSWORD" in line for line in added["docker-compose.yml"]) == 2
    for path in (*(set(after) - set(before)), *EDITED):
        assert path in result.stdout


def test_the_compose_service_has_the_shape_of_the_others(repo: Path) -> None:
    """In compose, the new service is the seller service with its own name, password,
    database, volume and a metrics port no one else uses; broker-setup gets its password;
    Prometheus scrapes it on that port."""
    assert new("loyalty", "--on", "OrderPlaced").exit_code == 0
    compose = yaml.safe_load((repo / "docker-compose.yml").read_text())
    ours, seller = compose["services"]["loyalty"], compose["services"]["seller"]
    assert set(ours) == set(seller)
    assert {k.replace("LOYALTY_", "SELLER_"): v.replace("LOYALTY_", "SELLER_").replace(
        "loyalty", "seller") for k, v in ours["environment"].items()} == seller["environment"]
    assert ours["command"] == ["python", "-m", "loyalty_service"]
    assert ours["volumes"] == ["loyalty-data:/app/data"]
    assert "loyalty-data" in compose["volumes"]
    assert "ports" not in ours
    port = int(ours["expose"][0])
    others = {int(p) for name, s in compose["services"].items() if name != "loyalty"
              for p in s.get("expose", ())}
    assert port > max(others)
    setup = compose["services"]["broker-setup"]["environment"]
    assert setup["LOYALTY_BROKER_PASSWORD"] == ours["environment"]["LOYALTY_BROKER_PASSWORD"]
    prometheus = yaml.safe_load((repo / "deploy" / "prometheus.yml").read_text())
    assert {"targets": [f"loyalty:{port}"], "labels": {"service": "loyalty"}} in [
        static for job in prometheus["scrape_configs"] for static in job["static_configs"]]


def test_a_second_subscriber_gets_the_next_metrics_port(repo: Path) -> None:
    """Two services made one after the other get two ports, each past those in use."""
    assert new("loyalty", "--on", "OrderPlaced").exit_code == 0
    assert new("returns", "--on", "ShipmentScheduled").exit_code == 0
    compose = yaml.safe_load((repo / "docker-compose.yml").read_text())
    first, second = (int(compose["services"][n]["expose"][0]) for n in ("loyalty", "returns"))
    assert second == first + 1


@pytest.mark.parametrize("events", [["OrderPlaced"], BUSINESS], ids=["one", "every"])
async def test_the_service_declares_a_handler_per_event_that_records_it(
        repo: Path, imported: Any, events: list[str]) -> None:
    """The written service is named once, consumes exactly the --on events, produces none,
    and each handler records what it receives through the store."""
    on = [arg for event in events for arg in ("--on", event)]
    assert new("gift_cards", *on).exit_code == 0
    module = imported("gift_cards_service.service")
    service = module.service
    assert isinstance(service, Service)
    assert (service.name, [c.__name__ for c in service.consumes]) == ("gift_cards", events)
    assert service.produced == ()
    assert (repo / "gift_cards_service" / "service.py").read_text().count('"gift_cards"') == 1

    class Recorder:
        def __init__(self) -> None:
            self.recorded: list[Event] = []

        async def record(self, event: Event) -> None:
            self.recorded.append(event)

    for cls in service.consumes:
        store, event = Recorder(), make_event(cls)
        handler = getattr(module, scaffold.Plan("gift_cards", (cls,), 0).handlers[cls.__name__])
        assert await handler(event, store) is None
        assert store.recorded == [event]


def test_every_line_written_fits_100_columns_with_the_longest_name_and_every_event(
        repo: Path) -> None:
    """With a name of the longest length and every event, each written line fits the
    codebase's line length, and every Python file compiles."""
    name = "a" * scaffold.MAX_NAME
    made = scaffold.plan(repo, name, BUSINESS)
    for path, text in made.created.items():
        compile(text, str(path), "exec")
        long = [line for line in text.splitlines() if len(line) > 100]
        assert not long, f"{path}: {long}"


def test_every_event_a_subscriber_may_handle_has_an_example_for_its_tests() -> None:
    """`--on` takes every business event and no kit event, and the written tests can build
    each (tests/factories.make_event)."""
    accepted = scaffold.business_events()
    assert set(accepted.values()) == set(EVENT_TYPES.values()) - KIT_EVENTS
    for cls in accepted.values():
        assert isinstance(make_event(cls), cls)


# --- what it refuses, writing nothing -----------------------------------------------------

REFUSALS = [
    (["Loyalty", "--on", "OrderPlaced"], "not a service name: a lower-case Python identifier"),
    (["gift-cards", "--on", "OrderPlaced"], "not a service name"),
    (["9lives", "--on", "OrderPlaced"], "not a service name"),
    (["café", "--on", "OrderPlaced"], "not a service name"),
    (["loyalty_service", "--on", "OrderPlaced"], "without _service"),
    (["a" * 25, "--on", "OrderPlaced"], "longer than 24 characters"),
    (["seller", "--on", "OrderPlaced"], "the name seller is taken"),
    (["rabbitmq", "--on", "OrderPlaced"], "docker-compose.yml has a service rabbitmq"),
    (["loyalty", "--on", "OrderShipped"], "OrderShipped is no event of common/events.py"),
    (["loyalty", "--on", "DeliveryReceipts"], "the kit's own"),
    (["loyalty", "--on", "SubscriberAnnounced"], "the kit's own"),
    (["audit", "--on", "OrderPlaced"], "audit.tracker (the kit's audit queue)"),
    (["stock", "--on", "OrderPlaced"], "where the system already has stock.reserv"),
]


@pytest.mark.parametrize(("args", "message"), REFUSALS, ids=[a[0][:12] + "-" + a[2]
                                                             for a, _ in REFUSALS])
def test_it_refuses_with_a_clear_message_and_writes_nothing(
        repo: Path, args: list[str], message: str) -> None:
    """A bad name, a taken one, one whose queues clash, or an event that is not a business
    event: exit 1, the reason on stderr, the repository as it was."""
    before = files_in(repo)
    result = new(*args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert files_in(repo) == before


@pytest.mark.parametrize("where", ["package", "unit test", "integration test", "entry point",
                                   "installed package", "installed service"])
def test_it_refuses_a_name_already_taken_or_a_target_that_exists(
        repo: Path, where: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: Any) -> None:
    """A package folder, a test file, an entry point in pyproject.toml, an importable
    package or an installed service of that name: refused, nothing written."""
    if where == "package":
        (repo / "loyalty_service").mkdir()
    elif where == "entry point":
        text = (repo / "pyproject.toml").read_text()
        (repo / "pyproject.toml").write_text(text.replace(
            'seller = "seller_service.service:service"\n',
            'seller = "seller_service.service:service"\nloyalty = "elsewhere:service"\n'))
    elif where == "installed service":  # its package named otherwise
        monkeypatch.setattr(discovery, "names", lambda: ["loyalty", "order"])
    elif where == "installed package":
        elsewhere = tmp_path_factory.mktemp("site")
        (elsewhere / "loyalty_service").mkdir()
        (elsewhere / "loyalty_service" / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(elsewhere))
    else:
        tier = where.split()[0]
        (repo / "tests" / tier / "test_loyalty.py").write_text("# someone's work\n")
    before = files_in(repo)
    result = new("loyalty", "--on", "OrderPlaced")
    assert result.exit_code == 1
    assert ("is taken" in result.stderr) or ("exists" in result.stderr), result.stderr
    assert files_in(repo) == before


@pytest.mark.parametrize(("prefix", "on_broker", "refused"), [
    ("", ["loyalty.order.placed", "loyalty.order.placed.dlq"], True),
    ("", ["loyalty.shipment.scheduled.retry.10s"], True),
    ("t1.", ["t1.loyalty.order.placed"], True),
    ("t1.", ["loyalty.order.placed", "t2.loyalty.order.placed"], False),
    ("", ["loyalty_points.order.placed", "seller.order.placed"], False),
], ids=["queue", "delay-queue", "prefixed", "another-prefix", "another-name"])
def test_a_name_whose_queues_are_already_on_the_broker_is_refused(
        repo: Path, prefix: str, on_broker: list[str], refused: bool) -> None:
    """Queues under `<prefix><name>.` left on the broker (a retired service's) refuse the
    name; others' queues do not."""
    if refused:
        with pytest.raises(RefusedError, match=r"the broker already has .* delete them"):
            scaffold.plan(repo, "loyalty", ["OrderPlaced"], prefix=prefix,
                          broker_queues=lambda: on_broker)
    else:
        scaffold.plan(repo, "loyalty", ["OrderPlaced"], prefix=prefix,
                      broker_queues=lambda: on_broker)


def test_outside_the_repository_it_says_where_to_run_it(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a folder without pyproject.toml, it says to run it from the repository's root."""
    monkeypatch.chdir(tmp_path)
    result = new("loyalty", "--on", "OrderPlaced")
    assert result.exit_code == 1
    assert "run the command from the repository's root" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_undoes_what_was_written(repo: Path) -> None:
    """When a file changed between the checks and the writing, every file written so far is
    removed or restored."""
    made = scaffold.plan(repo, "loyalty", ["OrderPlaced"])
    prometheus = repo / "deploy" / "prometheus.yml"
    prometheus.write_text(prometheus.read_text() + "# edited meanwhile\n")
    before = files_in(repo)
    with pytest.raises(RefusedError, match=r"deploy/prometheus\.yml changed meanwhile"):
        scaffold.write(repo, made)
    assert files_in(repo) == before
    assert not (repo / "loyalty_service").exists()


# --- .env and the entry point -------------------------------------------------------------

def test_an_existing_env_file_gets_the_new_password_and_keeps_the_rest(repo: Path) -> None:
    """With a .env, the service's broker password is appended to it (scripts/new-env --add);
    what it held stays, and it stays readable by its owner only."""
    env = repo / ".env"
    subprocess.run([sys.executable, str(repo / "scripts" / "new-env"), str(env)], check=True,
                   capture_output=True)
    before = env.read_text()
    result = new("loyalty", "--on", "OrderPlaced")
    assert result.exit_code == 0, result.output
    after = env.read_text()
    assert after.startswith(before)
    added = after.removeprefix(before).splitlines()
    assert [line.split("=")[0] for line in added] == ["LOYALTY_BROKER_PASSWORD"]
    assert len(added[0].split("=", 1)[1]) >= 24
    assert env.stat().st_mode & 0o077 == 0
    assert ".env: LOYALTY_BROKER_PASSWORD" in result.stdout


def test_new_env_add_appends_only_what_is_missing(tmp_path: Path) -> None:
    """`scripts/new-env --add` keeps every value of an existing file and appends the
    variables it lacks; `--add` and `--force` together are refused."""
    script, env = str(ROOT / "scripts" / "new-env"), tmp_path / ".env"
    env.write_text("# mine\nRABBITMQ_ADMIN_USER=root\nSHOP_API_TOKEN=keep-this-token-please")
    done = subprocess.run([sys.executable, script, "--add", str(env)], capture_output=True,
                          text=True, check=True)
    lines = env.read_text().splitlines()
    assert lines[:3] == ["# mine", "RABBITMQ_ADMIN_USER=root",
                         "SHOP_API_TOKEN=keep-this-token-please"]
    names = {line.split("=")[0] for line in lines[3:]}
    assert {"RABBITMQ_ADMIN_PASSWORD", "SHOP_OPERATOR_TOKEN"} <= names
    assert not {"SHOP_API_TOKEN", "RABBITMQ_ADMIN_USER"} & names
    assert "added to" in done.stderr
    again = env.read_text()
    subprocess.run([sys.executable, script, "--add", str(env)], capture_output=True, check=True)
    assert env.read_text() == again
    both = subprocess.run([sys.executable, script, "--add", "--force", str(env)],
                          capture_output=True, text=True, check=False)
    assert both.returncode == 2
    assert env.read_text() == again


def test_it_registers_the_entry_point_with_this_python(repo: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Unless --no-install, it reinstalls the project in place, without its dependencies,
    with the Python running it, and says so."""
    ran: list[list[str]] = []

    def run(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        ran.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    result = CliRunner().invoke(scaffold_cli.app, ["subscriber", "loyalty", "--on", "OrderPlaced"])
    assert result.exit_code == 0, result.output
    assert ran == [[sys.executable, "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "--no-deps", "-e", str(repo)]]
    assert "registered" in result.stdout
