"""`shop order ...`: place orders and follow them, as a client of the order service's API."""

from __future__ import annotations

import typer

from order_service.cli.orders import list_orders, status, trace
from order_service.cli.placing import place
from order_service.cli.registry import retire, subscribers

app = typer.Typer(
    help="Place orders and see which subscribers handled them (talks to the order API).",
    no_args_is_help=True,
)
app.command()(place)
app.command()(status)
app.command("list")(list_orders)
app.command()(subscribers)
app.command()(retire)
app.command()(trace)
