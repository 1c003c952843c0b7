"""`shop new subscriber NAME --on EVENT`: a working subscriber service in one command.

It writes the package `NAME_service/` (the service with a handler per event, its store and
tables, its `__main__`), a unit test of the handlers and an integration test on the real
broker, from the templates in common/ops/templates/, and adds the service to pyproject.toml,
docker-compose.yml and deploy/prometheus.yml (`common.ops.scaffold_edits`). Everything is
checked, and every edited file parsed, before anything is written: a refusal leaves the
repository as it was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import string
import textwrap
import tomllib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from common.events import EVENT_TYPES, KIT_EVENTS, Event
from common.kit import discovery
from common.kit.topology import Topology
from common.ops.scaffold_edits import (
    COMPOSE,
    PROMETHEUS,
    PYPROJECT,
    RefusedError,
    add_entry_point,
    add_scrape_target,
    add_to_compose,
    parse_yaml,
)

#: Short enough that every line written fits the codebase's 100 columns, and the names
#: derived from it (queues, broker user, classes) stay readable.
MAX_NAME = 24
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_WIDTH = 100
#: The first metrics port, when no service has one yet.
FIRST_METRICS_PORT = 9100

#: The queue names on the broker, or None when it does not answer.
BrokerQueues = Callable[[], Collection[str] | None]

__all__ = ["Plan", "RefusedError", "business_events", "plan", "write"]


@dataclass
class Plan:
    """What the command writes: new files, and files edited by adding lines."""

    name: str
    events: tuple[type[Event], ...]
    metrics_port: int
    created: dict[Path, str] = field(default_factory=dict)
    #: path -> (the text found, the text to write)
    edited: dict[Path, tuple[str, str]] = field(default_factory=dict)

    @property
    def package(self) -> str:
        return f"{self.name}_service"

    @property
    def handlers(self) -> dict[str, str]:
        """Event name -> its handler's name."""
        return {cls.__name__: "on_" + re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
                for cls in self.events}


def business_events() -> dict[str, type[Event]]:
    """The events a subscriber may handle: all but the kit's own (announcements, receipts)."""
    return {name: cls for name, cls in EVENT_TYPES.items() if cls not in KIT_EVENTS}


def plan(root: Path, name: str, on: Sequence[str], *, prefix: str = "",
         broker_queues: BrokerQueues = lambda: None) -> Plan:
    """Check everything and prepare every file; raises RefusedError, having written nothing.

    `prefix`: the deployment's SHOP_NAME_PREFIX, under which the broker's queues are named.
    """
    check_name(name)
    events = check_events(on)
    texts = {path: _read(root, path) for path in (PYPROJECT, COMPOSE, PROMETHEUS)}
    compose, prometheus = parse_yaml(texts[COMPOSE], COMPOSE), parse_yaml(texts[PROMETHEUS],
                                                                          PROMETHEUS)
    check_free(root, name, texts[PYPROJECT], compose, prometheus)
    check_queues(name, prefix, broker_queues)
    port = _free_metrics_port(compose, prometheus)
    result = Plan(name, events, port)
    result.created = render(result)
    result.edited = {
        PYPROJECT: (texts[PYPROJECT], add_entry_point(texts[PYPROJECT], name)),
        COMPOSE: (texts[COMPOSE], add_to_compose(texts[COMPOSE], name, port)),
        PROMETHEUS: (texts[PROMETHEUS], add_scrape_target(texts[PROMETHEUS], name, port)),
    }
    return result


def write(root: Path, plan: Plan) -> None:
    """Create the new files and write the edited ones; if one fails, undo the others."""
    created: list[Path] = []
    folders: list[Path] = []
    restore: dict[Path, bytes] = {}
    try:
        for relative, text in plan.created.items():
            path = root / relative
            if not path.parent.exists():
                path.parent.mkdir(parents=True)
                folders.append(path.parent)
            with path.open("x", encoding="utf-8") as out:  # "x": never over a file
                out.write(text)
            created.append(path)
        for relative, (before, after) in plan.edited.items():
            path = root / relative
            found = path.read_bytes()
            if found.decode("utf-8") != before:
                raise RefusedError(f"{relative} changed meanwhile: run the command again")
            restore[path] = found
            path.write_bytes(after.encode("utf-8"))
    except BaseException:
        for path, found in restore.items():
            path.write_bytes(found)
        for path in created:
            path.unlink()
        for folder in reversed(folders):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


# --- checks ---------------------------------------------------------------------------------

def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise RefusedError(
            f"{name!r} is not a service name: a lower-case Python identifier (a-z, 0-9 and _, "
            "from a letter), such as loyalty or gift_cards")
    if name.endswith("_service"):
        raise RefusedError(f"give the name without _service: "
                           f"{name.removesuffix('_service')} makes the package {name}")
    if len(name) > MAX_NAME:
        raise RefusedError(f"{name!r} is longer than {MAX_NAME} characters")


def check_events(on: Sequence[str]) -> tuple[type[Event], ...]:
    known = business_events()
    if not on:
        raise RefusedError(f"name an event with --on: one of {', '.join(known)}")
    for name in on:
        if name not in known:
            why = ("is the kit's own (announcements and receipts), not a business event"
                   if name in EVENT_TYPES else "is no event of common/events.py")
            raise RefusedError(f"--on {name} {why}: a subscriber handles one of "
                               f"{', '.join(known)}")
    return tuple(known[name] for name in dict.fromkeys(on))


def check_free(root: Path, name: str, pyproject: str, compose: Any, prometheus: Any) -> None:
    """The name is nobody's yet: no package, installed service, entry point, compose service
    or scrape target has it; and the files it would write do not exist."""
    package = f"{name}_service"
    taken = [
        ((root / package).exists(), f"{package}/ exists"),
        (importlib.util.find_spec(package) is not None, f"a package {package} is installed"),
        (name in discovery.names(), f"a service {name} is installed"),
        (name in _entry_points(pyproject), f"{PYPROJECT} declares a service {name}"),
        (name in (compose.get("services") or {}), f"{COMPOSE} has a service {name}"),
        (f"{name}-data" in (compose.get("volumes") or {}), f"{COMPOSE} has a volume {name}-data"),
        (name in {t.split(":")[0] for t in _targets(prometheus)},
         f"{PROMETHEUS} scrapes a host {name}"),
    ]
    for found, what in taken:
        if found:
            raise RefusedError(f"the name {name} is taken: {what}")
    for path in _test_paths(name):
        if (root / path).exists():
            raise RefusedError(f"{path} exists: move it away, or choose another name")


def system_names(prefix: str) -> dict[str, str]:
    """Every exchange and queue name the system uses (the events' exchanges and histories,
    the kit's audit queue, the installed services' queues), with what each is."""
    topology = Topology(prefix)

    def owned(queue: str) -> list[str]:
        return [*topology.service_queues(queue), topology.dead_letter_exchange(queue)]

    names = {topology.audit_exchange: "the audit exchange"}
    names |= dict.fromkeys(owned(topology.audit_queue), "the kit's audit queue")
    for cls in EVENT_TYPES.values():
        names.setdefault(topology.exchange(cls), f"the exchange of {cls.__name__}")
        if cls not in KIT_EVENTS:
            names[topology.history_stream(cls)] = f"the history of {cls.__name__}"
    for service in discovery.services().values():
        for cls in service.consumes:
            names |= dict.fromkeys(owned(topology.queue(service.name, cls)),
                                   f"a queue of the {service.name} service")
    return names


def check_queues(name: str, prefix: str, broker_queues: BrokerQueues) -> None:
    """The service's queues (`<prefix><name>.<event>`, with their delay and dead-letter
    queues) must be the only names under `<prefix><name>.`, where the DLQ tools and the
    doctor look for a service's queues: nothing the system uses may lie there, nor anything
    the broker already holds (a retired service's queues, say)."""
    space = f"{prefix}{name}."
    for taken, what in sorted(system_names(prefix).items()):
        if taken.startswith(space):
            raise RefusedError(f"the {name} service's queues would be named {space}*, where "
                               f"the system already has {taken} ({what}): choose another name")
    left = sorted(q for q in broker_queues() or () if q.startswith(space))
    if left:
        raise RefusedError(
            f"the broker already has {len(left)} queue(s) named {space}*, such as {left[0]} "
            "(a retired service's?): delete them (`rabbitmqctl delete_queue NAME` or the "
            "management UI), or choose another name")


# --- the new files ----------------------------------------------------------------------------

def render(plan: Plan) -> dict[Path, str]:
    """The package and its two tests."""
    name, package = plan.name, plan.package
    store = "".join(part.capitalize() for part in name.split("_")) + "Store"
    handlers = plan.handlers
    events = list(handlers)
    listed = " and ".join([", ".join(events[:-1]), events[-1]] if events[1:] else events)
    values = {"name": name, "NAME": name.upper(), "Store": store,
              "doc": textwrap.fill(f'"""The {name} service: it reacts to {listed}."""', _WIDTH),
              "consumes": _fit(f"    assert service.consumes == ({', '.join(events)}"
                               f"{',' if len(events) == 1 else ''})")}

    def fill(template: str, **more: str) -> str:
        text = files("common.ops.templates").joinpath(template).read_text(encoding="utf-8")
        return string.Template(text).substitute(values, **more)

    service = _fit(f'service = Service("{name}", store={store}, tables=metadata, '
                   f"metrics_port={plan.metrics_port})")
    handler_code = "".join(
        fill("handler.py.tmpl", Event=event, signature=_fit(
            f"async def {handler}(event: {event}, store: {store}) -> None:"))
        for event, handler in handlers.items())
    unit_tests = "".join(fill("test_unit_handler.py.tmpl", Event=event, handler=handler)
                         for event, handler in handlers.items())
    factories = {"tests.factories": ["make_event"]}
    unit, integration = _test_paths(name)
    return {
        Path(package, "__init__.py"): fill("init.py.tmpl"),
        Path(package, "__main__.py"): fill("main.py.tmpl"),
        Path(package, "service.py"): fill("service.py.tmpl", service=service, imports=_imports({
            "common.events": events, "common.kit.declare": ["Service"],
            f"{package}.store": [store, "metadata"]})) + handler_code,
        Path(package, "store.py"): fill("store.py.tmpl"),
        unit: fill("test_unit.py.tmpl", tests=unit_tests, imports=_imports({
            "common.events": ["Event", *events],
            f"{package}.service": [*handlers.values(), "service"],
            f"{package}.store": [store], **factories})),
        integration: fill("test_integration.py.tmpl", imports=_imports({
            "common.events": ["Event"], "common.kit.broker": ["Publisher"],
            "common.kit.topology": ["Topology"], f"{package}.service": ["service"],
            f"{package}.store": [store], **factories,
            "tests.integration.support": ["StartService", "wait_for"]})),
    }


def _test_paths(name: str) -> tuple[Path, Path]:
    return (Path("tests", "unit", f"test_{name}.py"),
            Path("tests", "integration", f"test_{name}.py"))


def _fit(line: str) -> str:
    """`line`, broken past the width at the last comma that fits, each line after the first
    aligned after its opening parenthesis."""
    indent, lines = " " * (line.index("(") + 1), []
    while len(line) > _WIDTH:
        at = line.rindex(", ", 0, _WIDTH)
        lines.append(line[:at + 1])
        line = indent + line[at + 2:]
    return "\n".join([*lines, line])


def _imports(modules: dict[str, list[str]]) -> str:
    """First-party imports as ruff's isort wants them: by module; constants, classes, then
    the rest; one line, or past the width a name a line."""
    def kind(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name.lower())

    lines = []
    for module in sorted(modules):
        names = sorted(dict.fromkeys(modules[module]), key=kind)
        line = f"from {module} import {', '.join(names)}"
        lines.append(line if len(line) <= _WIDTH else
                     f"from {module} import (\n" + "".join(f"    {n},\n" for n in names) + ")")
    return "\n".join(lines)


# --- what is there ----------------------------------------------------------------------------

def _read(root: Path, path: Path) -> str:
    try:
        return (root / path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise RefusedError(f"no {path} here: run the command from the repository's "
                           "root") from None


def _entry_points(pyproject: str) -> dict[str, str]:
    try:
        data = tomllib.loads(pyproject)
    except tomllib.TOMLDecodeError as exc:
        raise RefusedError(f"{PYPROJECT} does not parse: {exc}") from None
    found: dict[str, str] = data.get("project", {}).get("entry-points", {}).get(
        discovery.GROUP, {})
    return found


def _targets(prometheus: Any) -> list[str]:
    return [target for job in prometheus.get("scrape_configs") or ()
            for static in job.get("static_configs") or ()
            for target in static.get("targets") or ()]


def _free_metrics_port(compose: Any, prometheus: Any) -> int:
    """One past the highest metrics port in use: the installed services' own, and those
    compose exposes and Prometheus scrapes for a service run from a package."""
    services = {name: service for name, service in (compose.get("services") or {}).items()
                if str((service.get("command") or [""])[-1]).endswith("_service")}
    used = {int(target.rsplit(":", 1)[1]) for target in _targets(prometheus)
            if target.split(":")[0] in services}
    used |= {int(str(port).split("/")[0]) for service in services.values()
             for port in service.get("expose") or ()}
    used |= {int(s.settings_class.model_fields["metrics_port"].default or 0)
             for s in discovery.services().values()}
    return max(used | {FIRST_METRICS_PORT - 1}) + 1
