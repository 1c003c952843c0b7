"""`shop order ...`: place orders and follow them, as a client of the order service's API."""

from __future__ import annotations

import json
import sys
import time
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

from common.ops.cli_support import plain_console, print_json
from common.ops.credentials import ApiCredentials
from order_service.domain.order import NewOrder
from order_service.domain.views import OutcomeKind, outcome_detail

app = typer.Typer(
    help="Place orders and see which subscribers handled them (talks to the order API).",
    no_args_is_help=True,
)

DEFAULT_API = "http://127.0.0.1:8000"
#: Seconds between two polls of `status --wait`.
POLL_INTERVAL = 0.5
#: Orders asked for per request (the API's largest page), and listed at most.
PAGE = 200
MAX_LISTED = 10_000

Api = Annotated[str, typer.Option("--api", envvar="SHOP_API_URL", show_envvar=True,
                                  help="The order service's base URL.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

# Exit codes: 2 for input refused before anything was sent (as for a usage error), 1 for
# anything that went wrong talking to the service or an order not finished in time.
BAD_INPUT = 2
FAILED = 1


def make_client(base_url: str) -> httpx.Client:
    """The HTTP client every command uses (tests swap it for one with a fake transport)."""
    return httpx.Client(base_url=base_url, timeout=10.0)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _fail(message: str, code: int = FAILED) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# --- input ------------------------------------------------------------------------------

def parse_item(raw: str) -> dict[str, Any]:
    """One `--item SKU:QTY:PRICE:SELLER` as an order line, or ValueError saying what is wrong."""
    parts = raw.split(":")
    if len(parts) != 4:
        raise ValueError(f"--item {raw!r} is malformed: expected SKU:QTY:PRICE:SELLER, "
                         "for example SKU-BOOK-1:2:19.99:seller-books")
    sku, qty, price, seller = (p.strip() for p in parts)
    if not sku:
        raise ValueError(f"--item {raw!r}: the SKU is empty")
    if not seller:
        raise ValueError(f"--item {raw!r}: the seller is empty")
    try:
        quantity = int(qty)
    except ValueError:
        raise ValueError(f"--item {raw!r}: quantity {qty!r} is not a whole number") from None
    if quantity < 1:
        raise ValueError(f"--item {raw!r}: quantity must be at least 1, got {quantity}")
    try:
        unit_price = Decimal(price)
    except InvalidOperation:
        raise ValueError(f"--item {raw!r}: price {price!r} is not a number") from None
    if not unit_price.is_finite() or unit_price < 0:
        raise ValueError(f"--item {raw!r}: price must be a number, zero or more, got {price}")
    try:
        exact = unit_price == unit_price.quantize(Decimal("0.01"))
    except InvalidOperation:  # too many digits to be a price at all
        raise ValueError(f"--item {raw!r}: price {price} is too large") from None
    if not exact:
        raise ValueError(f"--item {raw!r}: price {price} has more than 2 decimal places")
    return {"sku": sku, "quantity": quantity, "unit_price": str(unit_price), "seller_id": seller}


def _validation_lines(errors: list[dict[str, Any]]) -> list[str]:
    """Pydantic/FastAPI errors as `field.path: message` lines (the `body.` prefix dropped)."""
    lines = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        if loc and loc[0] == "body":
            loc = loc[1:]
        msg = str(error.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        lines.append(f"  {'.'.join(loc) or '(order)'}: {msg}")
    return lines


def _read_file(file: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror or exc}", BAD_INPUT)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        source = "standard input" if file == "-" else file
        _fail(f"{source} is not valid JSON: {exc}", BAD_INPUT)
    if not isinstance(data, dict):
        _fail("the order file must hold one JSON object", BAD_INPUT)
    return data


# --- talking to the API -----------------------------------------------------------------

#: Tries of `shop place` when the connection fails before an answer: safe, since each try
#: carries the same Idempotency-Key.
PLACE_ATTEMPTS = 3


def _request(api: str, method: str, path: str, *, attempts: int = 1, operator: bool = False,
             **kwargs: Any) -> httpx.Response:
    """One request, with the token from the environment (the operator's for an `operator`
    action); `attempts` > 1 only for a request the server takes once however often it is
    sent (a lost answer is then asked for again)."""
    credentials = ApiCredentials()
    kwargs["headers"] = {**kwargs.get("headers", {}), **credentials.headers(operator=operator)}
    try:
        with make_client(api) as client:
            for _ in range(attempts - 1):
                try:
                    response = client.request(method, path, **kwargs)
                    break
                except httpx.TransportError:
                    continue
            else:
                response = client.request(method, path, **kwargs)
    except httpx.ConnectError:
        _fail(f"cannot reach the order API at {api}: is the order service running? (shop up)")
    except httpx.TimeoutException:
        _fail(f"the order API at {api} did not answer in time")
    except httpx.HTTPError as exc:
        _fail(f"talking to the order API at {api} failed: {exc}")
    if response.status_code == 401:
        variable = credentials.variable(operator=operator)
        sent = "authorization" in response.request.headers
        _fail(f"the order API at {api} refused the token in {variable}: set it to the "
              "service's token" if sent else
              f"the order API at {api} wants a token: set {variable} to the service's token")
    return response


def _check(response: httpx.Response) -> Any:
    """The JSON body of a successful answer; otherwise a readable error and exit."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success:
        return body
    detail = body.get("detail") if isinstance(body, dict) else None
    if response.status_code == 422 and isinstance(detail, list):
        _fail("the order service refused the request:\n"
              + "\n".join(_validation_lines(detail)), BAD_INPUT)
    message = detail if isinstance(detail, str) else response.text.strip() or "no details"
    _fail(f"the order service answered {response.status_code}: {message}")


def _when(iso: str | None) -> str:
    """An ISO timestamp from the API, shorter for a table (UTC, to the second)."""
    if not iso:
        return ""
    return iso.replace("T", " ")[:19] + " UTC"


# --- commands ---------------------------------------------------------------------------

@app.command()
def place(
    customer: Annotated[str | None, typer.Option(help="Customer id.")] = None,
    item: Annotated[list[str] | None, typer.Option(
        help="A line as SKU:QTY:PRICE:SELLER; repeat for more lines.")] = None,
    name: Annotated[str | None, typer.Option(help="Recipient's name.")] = None,
    street: Annotated[str | None, typer.Option(help="Street and number.")] = None,
    city: Annotated[str | None, typer.Option(help="City.")] = None,
    postal_code: Annotated[str | None, typer.Option(help="Postal code.")] = None,
    country: Annotated[str | None, typer.Option(help="ISO country code, e.g. DE.")] = None,
    currency: Annotated[str, typer.Option(help="ISO 4217 currency code.")] = "EUR",
    file: Annotated[str | None, typer.Option(
        "--file", help="The whole order as JSON from this file ('-' for standard input), "
                       "instead of the options above.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Sent as Idempotency-Key: the same key again places the order once. By "
             "default a new one for this command, which its own retries reuse.")] = None,
    api: Api = DEFAULT_API,
    as_json: AsJson = False,
) -> None:
    """Place an order; prints its id (the order is checked here before it is sent)."""
    options = {"--customer": customer, "--name": name, "--street": street, "--city": city,
               "--postal-code": postal_code, "--country": country}
    if file is not None:
        given = [flag for flag, value in options.items() if value is not None]
        if item:
            given.append("--item")
        if given:
            _fail(f"--file holds the whole order; drop {', '.join(given)}", BAD_INPUT)
        order: dict[str, Any] = _read_file(file)
    else:
        missing = [flag for flag, value in options.items() if value is None]
        if not item:
            missing.insert(1, "--item")
        if missing:
            _fail(f"missing {', '.join(missing)} (or give the whole order with --file)",
                  BAD_INPUT)
        try:
            lines = [parse_item(raw) for raw in item or []]
        except ValueError as exc:
            _fail(str(exc), BAD_INPUT)
        order = {"customer_id": customer, "lines": lines, "currency": currency,
                 "shipping_address": {"name": name, "street": street, "city": city,
                                      "postal_code": postal_code, "country": country}}
    try:
        # The API checks it again; checking here first means nothing is sent when it is bad.
        NewOrder.model_validate(order)
    except ValidationError as exc:
        _fail("the order is not valid:\n"
              + "\n".join(_validation_lines([dict(e) for e in exc.errors()])), BAD_INPUT)
    key = idempotency_key or str(uuid.uuid4())
    accepted = _check(_request(api, "POST", "/orders", json=order,
                               headers={"Idempotency-Key": key}, attempts=PLACE_ATTEMPTS))
    if as_json:
        print_json(accepted)
    else:
        typer.echo(accepted["order_id"])


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
        ("placed ", "bold"), _when(order["placed_at"])))
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
                      _when(sub.get("at")))
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
                             _when(outcome["at"]))
        console.print(outcomes)


@app.command()
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
        _fail(f"{order_id!r} is not an order id (a UUID)", BAD_INPUT)
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        current = _check(_request(api, "GET", f"/orders/{order_id}"))
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
        _fail(f"still waiting after {wait:g}s for: {', '.join(waiting)}")


def _pages(api: str, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """Up to `limit` orders from `cursor` on (the newest without), a page at a time, and
    where the next ones start when there are more."""
    orders: list[dict[str, Any]] = []
    while len(orders) < limit:
        params: dict[str, Any] = {"limit": min(PAGE, limit - len(orders))}
        if cursor is not None:
            params["cursor"] = cursor
        response = _request(api, "GET", "/orders", params=params)
        orders += _check(response)
        following = response.links.get("next", {}).get("url")
        cursor = httpx.URL(following).params.get("cursor") if following else None
        if cursor is None:
            break
    return orders, cursor


@app.command("list")
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


@app.command()
def subscribers(api: Api = DEFAULT_API, as_json: AsJson = False) -> None:
    """The subscriber registry: every service that announced itself, and what it consumes."""
    entries = _check(_request(api, "GET", "/subscribers"))
    if as_json:
        print_json(entries)
        return
    table = Table()
    table.add_column("subscriber")
    table.add_column("consumes")
    table.add_column("instance")
    table.add_column("first seen")
    table.add_column("last seen")
    for s in entries:
        # Queue names are long and follow from the names (`--json` has them): events only.
        table.add_row(s["name"], "\n".join(sorted(s["consumes"])), s["instance"],
                      _when(s["first_seen"]), _when(s["last_seen"]))
    plain_console().print(table)


@app.command()
def retire(
    name: Annotated[str, typer.Argument(help="The subscriber's name, as `shop order "
                                             "subscribers` lists it.")],
    force: Annotated[bool, typer.Option("--force", help="Retire it even though it announced "
                                                        "itself recently.")] = False,
    api: Api = DEFAULT_API,
    as_json: AsJson = False,
) -> None:
    """Take a subscriber shut down for good out of the registry: orders placed from now on
    stop expecting it. Its queue stays on the broker until you delete it. An operator
    action: sends SHOP_OPERATOR_TOKEN."""
    if not name.strip():
        _fail("the subscriber's name is empty", BAD_INPUT)
    entry = _check(_request(api, "DELETE", f"/subscribers/{quote(name, safe='')}",
                            params={"force": "true"} if force else None, operator=True))
    if as_json:
        print_json(entry)
        return
    queues = ", ".join(sorted(entry["consumes"].values()))
    plain_console().print(Text.assemble(
        "retired ", (entry["name"], "bold"),
        f": orders placed from now on do not expect it. Its queue(s) {queues} still receive "
        "events: delete them (`rabbitmqctl delete_queue <name>`) when it is gone for good."))


@app.command()
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
        _fail(f"{order_id!r} is not an order id (a UUID)", BAD_INPUT)
    found = _check(_request(api, "GET", f"/orders/{order_id}/trace"))
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
