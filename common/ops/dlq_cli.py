"""`shop dlq ...`: see why deliveries failed, replay them once the fault is fixed, purge them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from common.kit.settings import ServiceSettings
from common.ops import dlq, dlq_replay
from common.ops.cli_support import fail, plain_console, print_json
from common.ops.dead_letter import DeadLetter

T = TypeVar("T")

app = typer.Typer(
    help="Dead letters: why deliveries failed; replay them once the fault is fixed, or purge.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

Service = Annotated[str, typer.Argument(
    help="The subscriber service: an installed one (`shop up` runs them), or one that ran "
         "against this broker.",
    show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _run(operation: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(operation)
    except dlq.DlqError as exc:
        raise fail(str(exc)) from None


def _console() -> Console:
    # Built per command, so the terminal width (COLUMNS) is read when the command runs.
    return plain_console()


@app.command("list")
def list_(
    service: Service,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 200,
    as_json: AsJson = False,
) -> None:
    """The dead letters of a service: event, reason, exception, attempts, age.

    Reading them takes nothing away: they stay in their queues, in their order.
    """
    listing = _run(dlq.list_dead_letters(ServiceSettings(), service, limit=limit))
    now = datetime.now(UTC)
    if as_json:
        print_json({"service": service, "counts": listing.counts, "total": listing.total,
                    "dead_letters": [letter.summary(now) for letter in listing.letters]})
        return
    console = _console()
    if not listing.counts:
        console.print(f"{service} has no dead-letter queue on this broker yet "
                      "(it has not run here); nothing to show.")
        return
    if not listing.letters:
        console.print(f"no dead letters for {service} "
                      f"({', '.join(sorted(listing.counts))} empty)")
        return
    console.print(dead_letter_table(service, listing, now))


def dead_letter_table(service: str, listing: dlq.Listing, now: datetime) -> Table:
    """The table `shop dlq list` prints."""
    several = len({letter.dlq for letter in listing.letters}) > 1
    shown = len(listing.letters)
    table = Table(title=Text(f"dead letters of {service}", style="table.title"),
                  caption=(f"{shown} of {listing.total} shown (--limit)"
                           if shown < listing.total else f"{shown} in all"))
    table.add_column("event id", no_wrap=True)
    table.add_column("event type")
    if several:
        table.add_column("queue")
    table.add_column("reason")
    table.add_column("exception", overflow="fold")
    table.add_column("attempts", justify="right")
    table.add_column("age", justify="right", no_wrap=True)
    for letter in listing.letters:
        row = [letter.message_id or "-", letter.event_type or "-"]
        if several:
            row.append(letter.dlq)
        row += [letter.reason, _short(_exception(letter)), _attempts(letter),
                format_age(letter.age(now))]
        # Text, not str: a renderer may be printed by a console that reads markup.
        table.add_row(*map(Text, row))
    return table


@app.command()
def show(
    message_id: Annotated[str, typer.Argument(metavar="ID", help="The event id (message_id).",
                                              show_default=False)],
    as_json: AsJson = False,
) -> None:
    """One dead letter, found by its id in every dead-letter queue: headers and body.

    The same event can be dead-lettered by several subscribers; each copy is shown.
    """
    letters = _run(dlq.find_dead_letters(ServiceSettings(), message_id))
    if not letters:
        raise fail(f"no dead letter with id {message_id} in the system's dead-letter queues")
    if as_json:
        print_json([letter.details() for letter in letters])
        return
    console = _console()
    now = datetime.now(UTC)
    for letter in letters:
        console.print(dead_letter_panel(letter, now))


def dead_letter_panel(letter: DeadLetter, now: datetime) -> Panel:
    """What `shop dlq show` prints for one copy: facts, headers, the body pretty-printed."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    for name, value in (
        ("queue", letter.dlq),
        ("replays to", letter.original_queue),
        ("event type", letter.event_type),
        ("correlation id", letter.correlation_id),
        ("reason", letter.reason),
        ("exception", _exception(letter)),
        ("attempts", _attempts(letter)),
        ("failed at", _when(letter.failed_at)),
        ("first failed at", _when(letter.first_failed_at)),
        ("age", format_age(letter.age(now))),
        ("replayed before", str(letter.replay_count) if letter.replay_count else None),
    ):
        if value:
            facts.add_row(name, Text(value))
    headers = Table(title="headers", title_justify="left", show_edge=False)
    headers.add_column("header", no_wrap=True)
    headers.add_column("value", overflow="fold")
    for key, value in letter.headers.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        headers.add_row(Text(key), Text(shown))
    body = letter.body_json()
    rendered = (Syntax(json.dumps(body, indent=2, ensure_ascii=False), "json",
                       theme="ansi_dark", word_wrap=True)
                if not isinstance(body, str) else Text(body))
    return Panel(Group(facts, "", headers, "", Text("body", style="bold"), rendered),
                 # A Panel reads a str title as markup, whatever the console.
                 title=Text(f"dead letter {letter.message_id or '(no id)'}"),
                 title_align="left")


@app.command()
def replay(
    service: Service,
    ids: Annotated[list[str] | None, typer.Option(
        "--id", metavar="ID", help="The event id to replay; repeat for several.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Send dead letters back to the service's queue, attempts reset, once the fault is fixed.

    Each is acked in the dead-letter queue only after the broker confirmed its copy, and a
    "replayed" receipt records it in the order's status.
    """
    if bool(ids) == all_:
        raise fail("say which dead letters: --id ID (repeat it for several) or --all")
    report = _run(dlq_replay.replay(ServiceSettings(), service, message_ids=None if all_ else ids))
    for letter in report.replayed:
        typer.echo(f"replayed {letter.message_id} ({letter.event_type or 'unknown type'}) "
                   f"to {letter.original_queue}")
    for error in report.receipt_errors:
        typer.echo(f"Warning: {error}", err=True)
    for letter, error in report.failed:
        typer.echo(f"Error: {letter.message_id} stays in {letter.dlq}: {error}", err=True)
    for missing in report.not_found:
        typer.echo(f"Error: no dead letter with id {missing} in the dead-letter queues of "
                   f"{service}", err=True)
    count = len(report.replayed)
    typer.echo(f"{count} dead letter{'' if count == 1 else 's'} of {service} replayed")
    if report.failed or report.not_found:
        raise typer.Exit(1)


@app.command()
def purge(
    service: Service,
    yes: Annotated[bool, typer.Option("--yes", "-y",
                                      help="Do not ask first (for scripts).")] = False,
) -> None:
    """Delete every dead letter of a service, for good. Asks first unless --yes."""
    settings = ServiceSettings()
    if not yes:
        counts = _run(dlq.count_dead_letters(settings, service))
        total = sum(counts.values())
        if total == 0:
            typer.echo(f"no dead letters for {service}; nothing to purge")
            return
        try:
            confirmed = typer.confirm(
                f"Delete {total} dead letter{'' if total == 1 else 's'} of {service} "
                f"({', '.join(f'{q}: {n}' for q, n in counts.items() if n)})? "
                "They cannot be recovered.", default=False)
        except typer.Abort:  # no answer (no terminal, end of input)
            confirmed = False
        if not confirmed:
            raise fail("nothing purged (answer y, or pass --yes in scripts)")
    purged = _run(dlq_replay.purge(settings, service))
    total = sum(purged.values())
    typer.echo(f"purged {total} dead letter{'' if total == 1 else 's'} of {service}")


def format_age(age: timedelta | None) -> str:
    """An age for people: 42s, 5m 3s, 3h 10m, 2d 4h."""
    if age is None:
        return "-"
    seconds = max(0, int(age.total_seconds()))
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                             ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // small_size
            return f"{seconds // size}{unit}" + (f" {rest}{smaller}" if rest else "")
    return f"{seconds}s"


def _exception(letter: DeadLetter) -> str | None:
    if letter.exception and letter.by_broker:
        # Left from a failure before the broker gave up; not why it was parked.
        return f"earlier attempt: {letter.exception}"
    return letter.exception


def _attempts(letter: DeadLetter) -> str:
    # None when the broker parked it: it counts deliveries, not our attempts.
    return "-" if letter.attempts is None else str(letter.attempts)


def _short(text: str | None, width: int = 120) -> str:
    if not text:
        return "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None
