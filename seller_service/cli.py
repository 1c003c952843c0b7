"""`shop seller ...`: a seller's inbox of orders."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from pydantic import TypeAdapter, ValidationError
from rich.table import Table

from common.events import SellerId
from common.kit.db import run_with_store
from common.ops.cli_support import fail, plain_console, print_json
from seller_service.service import service
from seller_service.store import InboxStore, Notification, metadata

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, help="Sellers: the orders each seller has to ship.")

_SELLER_ID = TypeAdapter(SellerId)


def _run(work: Callable[[InboxStore], Awaitable[T]]) -> T:
    """Run `work` in one transaction on the seller service's own database."""
    return run_with_store(service.settings().db_url(), metadata, InboxStore, work)


def _as_dict(note: Notification) -> dict[str, object]:
    return {"seller_id": note.seller_id, "order_id": str(note.order_id),
            "lines": [line.model_dump(mode="json") for line in note.lines],
            "total": str(note.total), "currency": note.currency,
            "created_at": note.created_at.isoformat()}


@app.callback()
def _seller() -> None:
    """Sellers: the orders each seller has to ship."""
    # A callback keeps `inbox` a subcommand (`shop seller inbox ...`): a Typer app with a
    # single command and no callback would otherwise collapse into that command.


@app.command("inbox")
def inbox(
    seller_id: Annotated[str, typer.Argument(help="The seller, e.g. seller-books.")],
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show a seller's inbox: the orders with that seller's lines, newest first."""
    try:
        seller = _SELLER_ID.validate_python(seller_id)
    except ValidationError:
        raise fail(f"invalid seller id {seller_id!r}: use 1-64 letters, digits, '.', "
                   "'_' or '-', starting with a letter or digit") from None
    notes = _run(lambda store: store.inbox(seller, limit))
    if as_json:
        print_json([_as_dict(note) for note in notes])
        return
    if not notes:
        typer.echo(f"The inbox of {seller} is empty.")
        return
    table = Table(title=f"Inbox of {seller}")
    table.add_column("Order")
    table.add_column("Lines")
    table.add_column("Total", justify="right")
    table.add_column("When (UTC)")
    for note in notes:
        lines = "\n".join(f"{line.quantity} x {line.sku} @ {line.unit_price}"
                          for line in note.lines)
        table.add_row(str(note.order_id), lines, f"{note.total} {note.currency}",
                      note.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    plain_console().print(table)
