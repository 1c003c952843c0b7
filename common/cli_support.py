"""Small helpers the services' own commands share: errors and JSON on the terminal."""

from __future__ import annotations

import json
from typing import Any

import typer


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
