"""`shop events`: every event with its exchange, schema version, producers and subscribers;
its AsyncAPI document; and the wire-schema snapshots that keep its evolution additive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from common import contracts, evolution
from common.kit import discovery
from common.kit.declare import Service
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops.cli_support import fail, plain_console, print_json

app = typer.Typer()
err = plain_console(stderr=True)


def _services() -> list[Service[Any]]:
    found = list(discovery.services().values())
    if not found:
        err.print(f"no service is installed (entry points {discovery.GROUP!r}): producers and "
                  "subscribers are unknown")
    return found


@app.callback(invoke_without_command=True)
def events(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Every event: the exchange it is published to, its schema version, the services that
    produce it and those that consume it (from which queue)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = ServiceSettings()
    found = contracts.catalog(_services(), Topology(settings.name_prefix))
    if as_json:
        print_json([c.summary() for c in found])
        return
    table = Table(title="events")
    # Names are what a reader greps for: never cut short; the lists wrap instead.
    for column in ("event", "exchange", "version"):
        table.add_column(column, no_wrap=True)
    table.add_column("producers", min_width=12)
    table.add_column("subscribers (queue)", min_width=16)
    for c in found:
        subscribers = "\n".join(f"{s.service} ({s.queue})" for s in c.subscribers)
        table.add_row(*(Text(v) for v in (c.name, c.exchange, str(c.schema_version),
                                          ", ".join(c.producers) or "-", subscribers or "-")))
    console = plain_console()
    if not console.is_terminal:  # a pipe or a file: as wide as the table, not cut at 80
        console = plain_console(width=console.measure(table, options=console.options.update(
            width=10_000)).maximum)
    console.print(table)


@app.command()
def asyncapi() -> None:
    """Print the AsyncAPI 3.0 document of the events (JSON).

    Every exchange, subscriber queue and message schema, who produces and who consumes each
    event; the order API serves the same at GET /asyncapi.json.
    """
    settings = ServiceSettings()
    print_json(contracts.asyncapi(_services(), Topology(settings.name_prefix),
                                  broker_url=settings.amqp_url))


@app.command()
def snapshot(
    directory: Annotated[Path, typer.Option(
        "--dir", help="Where the snapshots are kept.")] = evolution.SNAPSHOTS,
) -> None:
    """Write each event's wire schema, for the test that keeps evolution additive.

    A developer's command, run from the repository's root: it writes
    <dir>/<EventType>.v<schema_version>.json. A new event or version gets a new file; an
    additive change (a new optional field) updates its version's file; a breaking change is
    refused, naming the field: bump the event's schema_version instead. Exits 1 when one
    was refused.
    """
    report = evolution.write_snapshots(directory, contracts.all_events(_services()))
    for path in report.written:
        typer.echo(f"wrote {path}")
    if report.refused:
        raise fail("breaking changes, not written (bump the event's schema_version to make "
                   "one):\n  " + "\n  ".join(report.refused))
    err.print(f"{len(report.unchanged)} snapshot(s) unchanged")
