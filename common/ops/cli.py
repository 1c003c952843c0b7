"""The `shop` command: runs the services and mounts each service's own commands.

The services are the installed ones (`common.kit.discovery`): none is named here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import zlib
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.text import Text

from common.kit import discovery
from common.kit.broker import connect, safe_url
from common.kit.logging import configure_logging
from common.kit.settings import ServiceSettings
from common.ops.broker_cli import app as broker_app
from common.ops.catchup_cli import catch_up
from common.ops.cli_support import fail, plain_console
from common.ops.dlq_cli import app as dlq_app
from common.ops.doctor import doctor
from common.ops.events_cli import app as events_app
from common.ops.queues_cli import queues
from common.ops.scaffold_cli import app as new_app

app = typer.Typer(
    help="A choreographed order platform on RabbitMQ: run it, place orders, watch the flow.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _mount_services() -> None:
    """`shop NAME ...`: each installed service's own commands, under its name."""
    for name, service in discovery.services().items():
        commands = service.commands()
        if commands is not None:
            app.add_typer(commands, name=name)


_mount_services()
app.add_typer(dlq_app, name="dlq", help="Dead letters: list, show, replay, purge.")
app.add_typer(broker_app, name="broker", help="Broker users: one per service, least privilege.")
app.add_typer(events_app, name="events", help="Event contracts: producers, subscribers, AsyncAPI.")
app.add_typer(new_app, name="new", help="Scaffolding: a new subscriber service in one command.")
app.command()(queues)
app.command()(doctor)
app.command("catch-up")(catch_up)

err = plain_console(stderr=True)


#: Each service's lines in `shop up` get one of these, chosen by its name.
_COLOURS = ("cyan", "green", "magenta", "yellow", "blue", "bright_cyan", "bright_green",
            "bright_magenta", "bright_yellow", "bright_blue")


def colour_of(name: str) -> str:
    """A service's colour in `shop up`: the same name, the same colour, every run."""
    return _COLOURS[zlib.crc32(name.encode()) % len(_COLOURS)]


@app.command()
def run(service: Annotated[str, typer.Argument(
        help="Which service to run (an installed one: see `shop up`).", show_default=False,
        autocompletion=discovery.names)]) -> None:
    """Run one service in the foreground (what `shop up` runs in a process of its own)."""
    try:
        found = discovery.service(service)
    except discovery.UnknownServiceError as exc:
        raise fail(str(exc)) from None
    found.main()


@app.command()
def up(
    broker_wait: Annotated[float, typer.Option(help="Seconds to wait for RabbitMQ.")] = 60.0,
    stop_timeout: Annotated[float, typer.Option(help="Seconds each service gets to stop.")] = 15.0,
) -> None:
    """Run every installed service as a process of its own, their logs interleaved.

    Ctrl-C or SIGTERM stops them all cleanly.
    """
    settings = ServiceSettings()
    err.print(f"waiting for RabbitMQ at {safe_url(settings.amqp_url)} ...")
    try:
        asyncio.run(_check_broker(settings.amqp_url, broker_wait))
    except ConnectionError as exc:
        err.print(Text.assemble(("error:", "red"), f" {exc}"))
        raise typer.Exit(1) from exc
    err.print("RabbitMQ answers; starting the services (Ctrl-C stops them)")
    raise typer.Exit(asyncio.run(_supervise(stop_timeout)))


async def _check_broker(url: str, wait: float) -> None:
    connection = await connect(url, "shop-up", wait=wait)
    await connection.close()


async def _supervise(stop_timeout: float) -> int:
    env = dict(os.environ)
    # Colours and the readable format for a person at a terminal; plain lines (JSON logs)
    # for a file or a pipe, where escape codes are noise.
    terminal = sys.stdout.isatty()
    if terminal:
        env.setdefault("LOG_FORMAT", "console")
    names = discovery.names()
    if not names:
        err.print("no service is installed: `make install` registers them", style="red")
        return 1
    children: dict[str, asyncio.subprocess.Process] = {}
    for name in names:
        children[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "common.kit", name, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
    width = max(map(len, names))
    pumps = [asyncio.create_task(_pump(name, proc, width, colour=terminal))
             for name, proc in children.items()]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    exits = {name: asyncio.create_task(proc.wait()) for name, proc in children.items()}
    stop_task = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait({stop_task, *exits.values()},
                                 return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if stop_task not in done:
        dead = [n for n, t in exits.items() if t in done]
        err.print(f"{', '.join(dead)} exited on its own; stopping the others", style="red")
        code = 1
    for proc in children.values():
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    _, pending = await asyncio.wait(exits.values(), timeout=stop_timeout)
    for name, task in exits.items():
        if task in pending:
            err.print(f"{name} did not stop within {stop_timeout:.0f} s; killing it", style="red")
            with contextlib.suppress(ProcessLookupError):
                children[name].kill()
            code = 1
    await asyncio.gather(*exits.values())
    await asyncio.gather(*pumps)
    stop_task.cancel()
    err.print("all services stopped")
    return code


async def _pump(name: str, proc: asyncio.subprocess.Process, width: int, *,
                colour: bool) -> None:
    if proc.stdout is None:
        return
    prefix = f"{name:<{width}} | "
    if colour:
        prefix = typer.style(prefix, fg=colour_of(name), bold=True)
    async for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        sys.stdout.write(prefix + line + "\n")
        sys.stdout.flush()


def main() -> None:
    """The `shop` command. Its log lines go to stderr: stdout carries only each command's
    result (`shop doctor --json | jq` must parse)."""
    try:
        settings = ServiceSettings()
    except ValidationError:
        # Only the log settings are wanted here; the command that needs the setting at
        # fault reads it again and says what is wrong.
        settings = ServiceSettings.model_construct()
    try:
        configure_logging(settings, name="shop")
    except ValueError as exc:  # the standard library's own words for an unknown LOG_LEVEL
        raise SystemExit(f"Error: LOG_LEVEL: {exc}") from None
    app()


if __name__ == "__main__":
    main()
