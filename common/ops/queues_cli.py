"""`shop queues`: every queue of the system, once or live, as a table, JSON or an SVG picture."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

import typer
from aio_pika.abc import AbstractRobustConnection
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from common.kit.broker import connect
from common.kit.settings import ServiceSettings
from common.ops import observe
from common.ops.cli_support import plain_console

#: Samples of a queue's ready count kept to tell a growing backlog.
GROWTH_SAMPLES = 3
#: The width of a saved picture when the output is not a terminal.
SVG_WIDTH = 120

err = plain_console(stderr=True)


def queue_names(prefix: str, snapshot: observe.BrokerSnapshot) -> list[str]:
    """The installed services' queues, and any other consumed queue the broker lists."""
    names = set(observe.system_queue_names(prefix))
    if snapshot.listed_all:
        names |= set(snapshot.discovered(prefix))
    return sorted(names)


async def read(settings: ServiceSettings, connection: AbstractRobustConnection | None = None
               ) -> tuple[observe.BrokerSnapshot, list[observe.QueueRow]]:
    """One look at the broker: the snapshot and the system's queue rows."""
    snapshot = await observe.read_broker(
        settings, observe.system_queue_names(settings.name_prefix), connection=connection)
    return snapshot, snapshot.rows(queue_names(settings.name_prefix, snapshot))


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def queue_table(rows: Sequence[observe.QueueRow], *, title: str,
                history: Mapping[str, Sequence[int | None]] | None = None,
                caption: str | None = None) -> Table:
    """The queues as a table: a queue without consumer or with dead letters in red, a
    growing backlog (with `history`) in yellow with an arrow."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    # Long queue names fold; the numbers never do (short headers keep them narrow).
    table.add_column("queue", overflow="fold")
    for column in ("ready", "unacked", "consumers", "pub/s", "deliv/s", "dlq"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        grows = history is not None and observe.growing(history.get(row.queue, ()),
                                                        GROWTH_SAMPLES)
        style = None
        if not row.exists:
            style = "dim"
        elif row.consumers == 0 or (row.dead_letters or 0) > 0:
            style = "red"
        ready = Text(_count(row.ready) + (" ↑" if grows else ""),
                     style="bold yellow" if grows else "")
        consumers = Text("missing" if not row.exists else _count(row.consumers),
                         style="bold" if row.consumers == 0 else "")
        dead = Text(_count(row.dead_letters), style="bold" if row.dead_letters else "")
        # Text, not str: a queue's name is anybody's, and may read as markup.
        table.add_row(Text(row.queue), ready, _count(row.unacked), consumers,
                      _rate(row.publish_rate), _rate(row.deliver_rate), dead, style=style)
    return table


def save_svg(renderable: RenderableType, path: Path, *, width: int, title: str) -> None:
    """The view as an SVG picture (Rich's console export), replaced in one step."""
    recorder = plain_console(record=True, file=io.StringIO(), width=width,
                             force_terminal=True, color_system="truecolor")
    recorder.print(renderable)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(recorder.export_svg(title=title), encoding="utf-8")
    os.replace(temporary, path)


def _width(console: Console) -> int:
    return console.width if console.is_terminal else SVG_WIDTH


def queues(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts (with --watch: "
                                                         "one JSON object per line per refresh).")
                       ] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Keep watching: a live view, refreshed "
                                                        "every --interval seconds; Ctrl-C leaves."
                                        )] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes with "
                                                          "--watch.")] = 2.0,
    svg: Annotated[Path | None, typer.Option(
        "--svg", metavar="PATH", dir_okay=False,
        help="Also save the view as an SVG picture (with --watch, the latest refresh).")] = None,
) -> None:
    """Every queue of the system: ready and unacked messages, consumers, publish and deliver
    rates, dead letters."""
    settings = ServiceSettings()
    if watch:
        # Ctrl-C: Live has restored the terminal on its way out; leave with status 0.
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_watch(settings, interval=interval, as_json=as_json, svg=svg))
        return
    snapshot, rows = asyncio.run(read(settings))
    if not snapshot.reachable:
        err.print(Text.assemble(("error:", "red"), f" {snapshot.error}"))
        raise typer.Exit(1)
    if snapshot.error:
        err.print(snapshot.error)
    table = queue_table(rows, title=f"queues ({snapshot.source})")
    if as_json:
        typer.echo(json.dumps({"source": snapshot.source,
                               "queues": [row.as_dict() for row in rows]}, indent=2))
    else:
        plain_console().print(table)
    if svg is not None:
        save_svg(table, svg, width=_width(plain_console()), title="shop queues")


async def _watch(settings: ServiceSettings, *, interval: float, as_json: bool,
                 svg: Path | None) -> None:
    """Refresh until Ctrl-C or SIGTERM; both leave quietly with the terminal restored."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    console = plain_console()
    history: dict[str, deque[int | None]] = defaultdict(lambda: deque(maxlen=GROWTH_SAMPLES))
    connection: AbstractRobustConnection | None = None
    live = None if as_json else Live(console=console, auto_refresh=False,
                                     redirect_stdout=False, redirect_stderr=False)
    try:
        with live if live is not None else contextlib.nullcontext():
            while True:
                if connection is None:
                    # One connection for the whole watch, for what the management API cannot
                    # tell (it is away, or a queue is too new for its statistics).
                    with contextlib.suppress(ConnectionError):
                        connection = await connect(settings.amqp_url, "shop-queues", wait=2)
                snapshot, rows = await read(settings, connection)
                for row in rows:
                    history[row.queue].append(row.ready)
                if as_json:
                    typer.echo(json.dumps(_frame(snapshot, rows, history)))
                if live is not None or svg is not None:
                    view = _view(snapshot, rows, history, interval)
                    if live is not None:
                        live.update(view, refresh=True)
                    if svg is not None:
                        save_svg(view, svg, width=_width(console), title="shop queues --watch")
                await asyncio.sleep(interval)  # the refresh period the user asked for
    except asyncio.CancelledError:  # SIGTERM (or Ctrl-C): leave like Ctrl-C does
        pass
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


def _frame(snapshot: observe.BrokerSnapshot, rows: Sequence[observe.QueueRow],
           history: Mapping[str, Sequence[int | None]]) -> dict[str, Any]:
    """One refresh as a JSON object (a line of `--watch --json`)."""
    return {
        "at": snapshot.taken_at.isoformat(),
        "source": snapshot.source,
        "reachable": snapshot.reachable,
        "error": snapshot.error,
        "queues": [{**row.as_dict(),
                    "growing": observe.growing(history.get(row.queue, ()), GROWTH_SAMPLES)}
                   for row in rows],
    }


def _view(snapshot: observe.BrokerSnapshot, rows: Sequence[observe.QueueRow],
          history: Mapping[str, Sequence[int | None]], interval: float) -> RenderableType:
    when = snapshot.taken_at.astimezone(UTC).strftime("%H:%M:%S UTC")
    title = (f"queues ({snapshot.source}) at {when}, every {interval:g} s; Ctrl-C leaves")
    caption = ("pub/s, deliv/s: messages per second in and out; dlq: dead letters waiting. "
               "Red: no consumer, or dead letters; yellow ↑: ready grew over the last "
               f"{GROWTH_SAMPLES} samples")
    parts: list[RenderableType] = [queue_table(rows, title=title, history=history,
                                               caption=caption)]
    if snapshot.error:
        parts.append(Text(snapshot.error, style="red" if not snapshot.reachable else "yellow"))
    return Group(*parts)
