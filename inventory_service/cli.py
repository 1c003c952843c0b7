"""`shop inventory ...`: an operator's view of the stock."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from pydantic import TypeAdapter, ValidationError
from rich.table import Table

from common.events import Sku
from common.kit.db import run_with_store
from common.ops.cli_support import fail, plain_console, print_json
from inventory_service.service import service
from inventory_service.store import StockBelowReservedError, StockLevel, StockStore, metadata

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, help="Inventory: the stock per SKU.")
stock_app = typer.Typer(no_args_is_help=True, help="Set and list the stock per SKU.")
app.add_typer(stock_app, name="stock")

_SKU = TypeAdapter(Sku)


def _run(work: Callable[[StockStore], Awaitable[T]]) -> T:
    """Run `work` in one transaction on inventory's own database."""
    return run_with_store(service.settings().db_url(), metadata, StockStore, work)


def _as_dict(level: StockLevel) -> dict[str, object]:
    return {"sku": level.sku, "on_hand": level.on_hand, "reserved": level.reserved,
            "available": level.available, "updated_at": level.updated_at.isoformat()}


# ignore_unknown_options lets "-1" reach the range check (a clear "not in the range
# x>=0") instead of being refused as an unknown option.
@stock_app.command("set", context_settings={"ignore_unknown_options": True})
def set_stock(
    sku: Annotated[str, typer.Argument(help="The SKU, e.g. SKU-BOOK-1.")],
    quantity: Annotated[int, typer.Argument(min=0, help="Units on hand (0 or more).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Set the units on hand for SKU (adds the SKU if it is new)."""
    try:
        sku = _SKU.validate_python(sku)
    except ValidationError:
        raise fail(f"invalid SKU {sku!r}: use 1-64 letters, digits, '.', '_' or '-', "
                   "starting with a letter or digit") from None
    try:
        level = _run(lambda store: store.set_stock(sku, quantity))
    except StockBelowReservedError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(_as_dict(level)))
    else:
        typer.echo(f"{level.sku}: {level.on_hand} on hand, {level.reserved} reserved, "
                   f"{level.available} available")


@stock_app.command("list")
def list_stock(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the stock of every SKU."""
    levels = _run(lambda store: store.list_stock())
    if as_json:
        print_json([_as_dict(level) for level in levels])
        return
    if not levels:
        typer.echo("No stock yet: add some with `shop inventory stock set SKU QUANTITY`.")
        return
    table = Table(title="Stock")
    table.add_column("SKU")
    for name in ("On hand", "Reserved", "Available"):
        table.add_column(name, justify="right")
    table.add_column("Updated (UTC)")
    for level in levels:
        table.add_row(level.sku, str(level.on_hand), str(level.reserved), str(level.available),
                      level.updated_at.strftime("%Y-%m-%d %H:%M:%S"))
    plain_console().print(table)
