"""`shop order status|list|trace`: an order's fan-out and timeline, the latest orders."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table
from rich.text import Text

from common.ops.cli_support import plain_console, print_json
from order_service.cli.client import (
    BAD_INPUT,
    DEFAULT_API,
    Api,
    AsJson,
    check,
    fail,
    request,
    when,
)
from order_service.domain.views import OutcomeKind, outcome_detail

#: Seconds between two polls of `status --wait`.
POLL_INTERVAL = 0.5
#: Orders asked for per request (the API's largest page), and listed at most.
PAGE = 200
MAX_LISTED = 10_000


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


#: How each subscriber status shows: late stands out from pending.
STATUS_COLOURS = {"handled": "green", "failed": "red", "retrying": "yellow",
                  "pending": "yellow", "late": "bold magenta"}


def _status_view(status: dict[str, Any]) -> None:
    console = plain_console()
    order = status["order"]
    console.print(Text.assemble(
        ("order ", "bold"), order["order_id"], "  ", ("state ", "bold"),
        (status["state"], "cyan")))
    console.print(Text.assemble(
        ("customer ", "bold"), order["customer_id"], "  ",
        ("total ", "bold"), f"{order['total']} {order['currency']}", "  ",
        ("placed ", "bold"), when(order["placed_at"])))
    table = Table(title="Subscribers of OrderPlaced", title_justify="left")
    for column in ("subscriber", "outcome", "error", "duration", "at"):
        table.add_column(column)
    for sub in status["subscribers"]:
        name = sub["name"] if sub["expected"] else f"{sub['name']} (joined later)"
        duration = sub.get("duration_ms")
        error = sub.get("error") or ""
        if sub.get("dead_letter_queue"):
            error += f"\nwaits in {sub['dead_letter_queue']}"
        table.add_row(name, Text(sub["status"], style=STATUS_COLOURS.get(sub["status"], "")),
                      error, "" if duration is None else f"{duration:.1f} ms",
                      when(sub.get("at")))
    if not status["subscribers"]:
        console.print("no subscriber of OrderPlaced was registered when this order was placed",
                      style="yellow")
    else:
        console.print(table)
    if status["outcomes"]:
        outcomes = Table(title="Outcomes", title_justify="left")
        outcomes.add_column("kind")
        outcomes.add_column("detail")
        outcomes.add_column("at")
        for outcome in status["outcomes"]:
            kind: OutcomeKind = outcome["kind"]
            outcomes.add_row(kind, outcome_detail(kind, outcome["detail"]),
                             when(outcome["at"]))
        console.print(outcomes)


def status(
    order_id: Annotated[str, typer.Argument(help="The order's id.")],
    wait: Annotated[float | None, typer.Option(
        "--wait", min=0, metavar="SECONDS",
        help="Wait up to this long for every expected subscriber to answer; "
             "exit 1 if some are still pending, retrying or late then.")] = None,
    api: Api = DEFAULT_API,
    as_json: AsJson = False,
) -> None:
    """An order's state, each subscriber's answer to its OrderPlaced, and the outcomes."""
    try:
        uuid.UUID(order_id)
    except ValueError:
        fail(f"{order_id!r} is not an order id (a UUID)", BAD_INPUT)
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        current = check(request(api, "GET", f"/orders/{order_id}"))
        if deadline is None or current["complete"]:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _sleep(min(POLL_INTERVAL, left))
    if as_json:
        print_json(current)
    else:
        _status_view(current)
    if deadline is not None and not current["complete"]:
        waiting = [f"{s['name']} ({s['status']})" for s in current["subscribers"]
                   if s["status"] in ("pending", "retrying", "late")]
        fail(f"still waiting after {wait:g}s for: {', '.join(waiting)}")


def _pages(api: str, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """Up to `limit` orders from `cursor` on (the newest without), a page at a time, and
    where the next ones start when there are more."""
    orders: list[dict[str, Any]] = []
    while len(orders) < limit:
        params: dict[str, Any] = {"limit": min(PAGE, limit - len(orders))}
        if cursor is not None:
            params["cursor"] = cursor
        response = request(api, "GET", "/orders", params=params)
        orders += check(response)
        following = response.links.get("next", {}).get("url")
        cursor = httpx.URL(following).params.get("cursor") if following else None
        if cursor is None:
            break
    return orders, cursor


def list_orders(
    limit: Annotated[int, typer.Option(min=1, max=MAX_LISTED,
                                       help="How many, newest first.")] = 50,
    cursor: Annotated[str | None, typer.Option(
        help="Go on from where an earlier list stopped (the cursor it printed).")] = None,
    api: Api = DEFAULT_API,
    as_json: AsJson = False,
) -> None:
    """The latest orders, newest first, with how many subscribers handled each."""
    orders, more = _pages(api, limit, cursor)
    if more is not None:
        typer.echo(f"more orders: shop order list --cursor {more}", err=True)
    if as_json:
        print_json(orders)
        return
    table = Table()
    table.add_column("order", no_wrap=True)
    table.add_column("state", no_wrap=True)
    # No customer column: with a full order id it would not fit 80 columns (`--json` has it).
    table.add_column("total", justify="right", no_wrap=True)
    table.add_column("handled", no_wrap=True)
    for o in orders:
        others = o["failed"] + o["pending"] + o.get("retrying", 0) + o.get("late", 0)
        handled = Text(f"{o['handled']}/{o['handled'] + others}")
        for key in ("failed", "late"):
            if o.get(key):
                handled.append(f" ({o[key]} {key})", style=STATUS_COLOURS[key])
        table.add_row(o["order_id"], o["state"], f"{o['total']} {o['currency']}", handled)
    plain_console().print(table)


def trace(
    order_id: Annotated[str, typer.Argument(help="The order's id.")],
    api: Api = DEFAULT_API,
    as_json: AsJson = False,
) -> None:
    """The order's timeline across the services: placed, published, each receipt, each
    outcome, with the time since placement and how long each step took."""
    try:
        uuid.UUID(order_id)
    except ValueError:
        fail(f"{order_id!r} is not an order id (a UUID)", BAD_INPUT)
    found = check(request(api, "GET", f"/orders/{order_id}/trace"))
    if as_json:
        print_json(found)
        return
    table = Table(title=f"order {found['order_id']}", title_justify="left")
    table.add_column("+ms", justify="right", no_wrap=True)
    table.add_column("service", no_wrap=True)
    table.add_column("step", no_wrap=True)
    table.add_column("what", overflow="fold")
    table.add_column("took", justify="right", no_wrap=True)
    colours = {"handled": "green", "duplicate": "green", "retried": "yellow",
               "dead_lettered": "red", "replayed": "yellow"}
    for step in found["steps"]:
        kind = step["kind"]
        label = Text(kind if not step.get("outcome") or kind != "receipt"
                     else step["outcome"], style=colours.get(step.get("outcome") or "", ""))
        took = step.get("duration_ms")
        table.add_row(f"{step['since_placed_ms']:.1f}", step["service"], label, step["what"],
                      "" if took is None else f"{took:.1f} ms")
    plain_console().print(table)
