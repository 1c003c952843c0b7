"""`shop catch-up`: give a subscriber added later the events published before it existed."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from common.kit.settings import ServiceSettings
from common.ops import catchup
from common.ops.cli_support import fail, plain_console, print_json

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime) -> datetime:
    """A time as ISO 8601 (UTC when it names no zone), or how long ago (`90m`, `2h`, `7d`)."""
    ago = _AGO.match(text.strip())
    if ago:
        return now - timedelta(**{_UNITS[ago.group(2)]: float(ago.group(1))})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r} is neither a time (2026-11-30T12:00:00Z, "
                         "2026-11-30) nor a duration ago (90m, 2h, 7d)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def catch_up(
    service: Annotated[str, typer.Argument(
        help="The subscriber service to catch up (its queues receive the copies).",
        show_default=False)],
    events: Annotated[list[str] | None, typer.Option(
        "--event", metavar="EVENT_TYPE",
        help="Only this event type (OrderPlaced, ...); repeat for several. Default: every "
             "event the service has a queue for.")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", metavar="TIME",
        help="The events that occurred at or after TIME: ISO 8601 (UTC unless it says) or "
             "a duration ago (90m, 2h, 7d).")] = None,
    from_start: Annotated[bool, typer.Option(
        "--from-start", help="Every event the broker still keeps.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Replay the history the broker keeps of each event into one subscriber's queue only.

    Up to the end of each history as the command starts; the other subscribers see nothing,
    and the subscriber's dedupe drops what it already had, so running it again is harmless.
    Events older than SHOP_RETENTION_HOURS are left out: the subscriber no longer remembers
    whether it handled them.
    """
    if (since is None) == (not from_start):
        raise fail("say where to start: --since TIME or --from-start")
    now = datetime.now(UTC)
    try:
        start = parse_since(since, now) if since is not None else None
        result = asyncio.run(catchup.catch_up(ServiceSettings(), service, events=events,
                                              since=start, now=now))
    except (ValueError, catchup.CatchUpError) as exc:
        raise fail(str(exc)) from None
    for report in result.events:
        if not report.kept:
            typer.echo(f"Warning: no history of {report.event_type} is kept ({report.history} "
                       "does not exist: SHOP_HISTORY off, or nothing published since)",
                       err=True)
    if as_json:
        print_json(result.summary())
        return
    table = Table(title=Text(f"caught up {service}", style="table.title"),
                  caption=f"{result.replayed} event(s) replayed")
    table.add_column("event type")
    table.add_column("queue")
    for column in ("replayed", "before --since", "too old"):
        table.add_column(column, justify="right")
    for report in result.events:
        table.add_row(*map(Text, (report.event_type, report.queue,
                                  str(report.replayed) if report.kept else "no history",
                                  str(report.before_since), str(report.too_old))))
    plain_console().print(table)
