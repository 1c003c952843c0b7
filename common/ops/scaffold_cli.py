"""`shop new subscriber NAME --on EVENT ...`: write a working subscriber service, add it to
the deployment files, register it, and say what to do next."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import httpx
import typer
from pydantic import ValidationError

from common.kit.logging import get_logger
from common.kit.settings import ServiceSettings
from common.ops.cli_support import fail
from common.ops.observe import management_queue_names
from common.ops.scaffold import Plan, RefusedError, business_events, plan, write
from common.ops.scaffold_edits import COMPOSE, PROMETHEUS, PYPROJECT

app = typer.Typer(no_args_is_help=True)
log = get_logger(__name__)

_WHAT = {PYPROJECT: "its entry point",
         COMPOSE: "the service, its volume, its broker password for broker-setup",
         PROMETHEUS: "its metrics' scrape target"}


@app.callback()
def _new() -> None:
    """Scaffolding: a new subscriber service in one command."""
    # A callback keeps `subscriber` a subcommand (`shop new subscriber ...`).


@app.command()
def subscriber(
    name: Annotated[str, typer.Argument(
        help="The service's name: a lower-case Python identifier, e.g. loyalty.",
        show_default=False)],
    on: Annotated[list[str], typer.Option(
        "--on", help="An event it handles (repeat for more): OrderPlaced, StockReserved, ...",
        show_default=False, autocompletion=lambda: list(business_events()))],
    install: Annotated[bool, typer.Option(
        help="Register the service's entry point at once (pip install -e . --no-deps with "
             "this Python); --no-install leaves it to `make install`.")] = True,
) -> None:
    """Write a new subscriber service that works, a handler per --on event.

    From the repository's root: writes NAME_service/ (each handler records what it receives
    in the service's own table), a unit and an integration test, and adds the service to
    pyproject.toml, docker-compose.yml and deploy/prometheus.yml (lines added, none
    changed). Refused, writing nothing: a name that is not a lower-case identifier, is
    taken, or whose queues would clash with the system's or the broker's; an event that is
    not a business event.
    """
    root = Path.cwd()
    try:
        settings = ServiceSettings()
    except ValidationError:  # only the prefix and the broker's address are wanted here
        settings = ServiceSettings.model_construct()
    try:
        made = plan(root, name, on, prefix=settings.name_prefix,
                    broker_queues=lambda: broker_queues_of(settings))
        write(root, made)
    except RefusedError as exc:
        raise fail(str(exc)) from None
    log.info("subscriber service written", service=name, files=len(made.created),
             edited=[str(path) for path in made.edited])
    env = _add_password(root, made)
    registered = _register(root) if install else None
    _report(made, env, registered)


def broker_queues_of(settings: ServiceSettings) -> list[str] | None:
    """The queues on the broker, when its management API answers."""
    try:
        return asyncio.run(management_queue_names(settings))
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        log.warning("the broker's management API did not answer: queues left on it are not "
                    "checked", error=str(exc) or type(exc).__name__)
        return None


def _add_password(root: Path, made: Plan) -> str | None:
    """The service's broker password added to an existing .env (scripts/new-env --add);
    None when there is no .env, or when the script could not add it."""
    env, variable = root / ".env", f"{made.name.upper()}_BROKER_PASSWORD"
    if not env.exists():
        return None
    script = [sys.executable, str(root / "scripts" / "new-env"), "--add", str(env)]
    # S603: this Python running the repository's own script, fixed arguments, no shell.
    done = subprocess.run(script, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0 or variable not in env.read_text(encoding="utf-8"):
        log.warning("could not add the broker password to .env: run python3 scripts/new-env "
                    "--add", output=(done.stderr or done.stdout).strip())
        return None
    return variable


def _register(root: Path) -> bool:
    """Reinstall the project in place, so the entry point (and the package) are found."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-deps", "-e", str(root)]
    log.info("registering the entry point", command=" ".join(command[2:]))
    # S603: this Python's pip, fixed arguments, no shell.
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        log.warning("could not register the entry point: run make install",
                    output=(done.stderr or done.stdout).strip()[-2000:])
    return done.returncode == 0


def _report(made: Plan, env: str | None, registered: bool | None) -> None:
    name = made.name
    lines = [f"wrote the {name} service, on {', '.join(made.handlers)}:"]
    lines += [f"  {path}" for path in made.created]
    lines += ["added lines to:"] + [f"  {path}: {_WHAT[path]}" for path in made.edited]
    if env:
        lines.append(f"  .env: {env}")
    if registered:
        lines.append(f"registered: `shop run {name}` finds it now")
    else:
        lines.append("not registered yet: `make install` registers it")
    handlers = ", ".join(made.handlers.values())
    lines += [
        "next:",
        f"  write the reaction to each event in {made.package}/service.py ({handlers})",
        "  make test        the new tests run with the others",
        f"  shop up          runs {name} beside the other services; `shop run {name}` alone",
        f"  shop catch-up {name} --from-start   hands it the events published before it existed",
    ]
    typer.echo("\n".join(lines))
