"""Small helpers the services' own commands share: errors, JSON and text on the terminal."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console


def fail(message: str) -> typer.Exit:
    """Print `Error: <message>` on stderr; returns the exit (status 1) for the caller to raise.

    Raised at the call site (`raise fail(...) from None`) so the reader, and the type checker,
    see the command stop there.
    """
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code=1)


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout, for scripts (`--json`)."""
    typer.echo(json.dumps(data, indent=2))


def plain_console(*, stderr: bool = False, **options: Any) -> Console:
    """A Rich console that prints text as it is: no markup, no emoji codes, no highlighting.

    What the commands show comes from the broker, the API and users (an error message, a
    reason, a name, a queue), and Rich reads `[/x]` in a string as a closing tag (a
    MarkupError) and `[bold]` as a style. Our own styles go in `Text` and `style=`. A
    Panel's title is read as markup whatever the console: give it a `Text`.
    """
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, **options)
