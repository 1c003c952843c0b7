"""`shop logistics ...`: the shipments logistics scheduled."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from common.kit.db import run_with_store
from common.ops.cli_support import fail, plain_console, print_json
from logistics_service.domain import Shipment
from logistics_service.service import service
from logistics_service.store import ShipmentStore, metadata

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, help="Logistics: the shipments scheduled for orders.")
shipments_app = typer.Typer(no_args_is_help=True, help="List and show shipments.")
app.add_typer(shipments_app, name="shipments")


def _run(work: Callable[[ShipmentStore], Awaitable[T]]) -> T:
    """Run `work` in one transaction on logistics' own database."""
    return run_with_store(service.settings().db_url(), metadata, ShipmentStore, work)


def _as_dict(shipment: Shipment) -> dict[str, str]:
    return {"shipment_id": str(shipment.shipment_id), "order_id": str(shipment.order_id),
            "carrier": shipment.carrier, "tracking_number": shipment.tracking_number,
            "destination_country": shipment.destination_country,
            "estimated_delivery": shipment.estimated_delivery.isoformat()}


def _table(shipments: list[Shipment]) -> Table:
    table = Table(title="Shipments")
    for name in ("Order", "Carrier", "Tracking", "To", "Estimated delivery"):
        table.add_column(name)
    for s in shipments:
        table.add_row(str(s.order_id), s.carrier, s.tracking_number, s.destination_country,
                      s.estimated_delivery.isoformat())
    return table


@shipments_app.command("list")
def list_shipments(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the most recent shipments."""
    shipments = _run(lambda store: store.list_shipments(limit))
    if as_json:
        print_json([_as_dict(s) for s in shipments])
    elif not shipments:
        typer.echo("No shipments yet.")
    else:
        plain_console().print(_table(shipments))


@shipments_app.command("show")
def show_shipment(
    order_id: Annotated[str, typer.Argument(help="The order's id (a UUID).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show the shipment of one order."""
    try:
        order = uuid.UUID(order_id)
    except ValueError:
        raise fail(f"{order_id!r} is not an order id (expected a UUID)") from None
    shipment = _run(lambda store: store.get(order))
    if shipment is None:
        raise fail(f"no shipment for order {order}")
    if as_json:
        print_json(_as_dict(shipment))
    else:
        plain_console().print(_table([shipment]))
