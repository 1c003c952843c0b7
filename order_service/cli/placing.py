"""`shop order place`: an order from options or a JSON file, checked here, then sent."""

from __future__ import annotations

import json
import sys
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from common.ops.cli_support import print_json
from order_service.cli.client import (
    BAD_INPUT,
    DEFAULT_API,
    Api,
    AsJson,
    check,
    fail,
    request,
    validation_lines,
)
from order_service.domain.order import NewOrder

#: Tries of `shop place` when the connection fails before an answer: safe, since each try
#: carries the same Idempotency-Key.
PLACE_ATTEMPTS = 3


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


def _read_file(file: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}", BAD_INPUT)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        source = "standard input" if file == "-" else file
        fail(f"{source} is not valid JSON: {exc}", BAD_INPUT)
    if not isinstance(data, dict):
        fail("the order file must hold one JSON object", BAD_INPUT)
    return data


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
            fail(f"--file holds the whole order; drop {', '.join(given)}", BAD_INPUT)
        order: dict[str, Any] = _read_file(file)
    else:
        missing = [flag for flag, value in options.items() if value is None]
        if not item:
            missing.insert(1, "--item")
        if missing:
            fail(f"missing {', '.join(missing)} (or give the whole order with --file)",
                 BAD_INPUT)
        try:
            lines = [parse_item(raw) for raw in item or []]
        except ValueError as exc:
            fail(str(exc), BAD_INPUT)
        order = {"customer_id": customer, "lines": lines, "currency": currency,
                 "shipping_address": {"name": name, "street": street, "city": city,
                                      "postal_code": postal_code, "country": country}}
    try:
        # The API checks it again; checking here first means nothing is sent when it is bad.
        NewOrder.model_validate(order)
    except ValidationError as exc:
        fail("the order is not valid:\n"
             + "\n".join(validation_lines([dict(e) for e in exc.errors()])), BAD_INPUT)
    key = idempotency_key or str(uuid.uuid4())
    accepted = check(request(api, "POST", "/orders", json=order,
                             headers={"Idempotency-Key": key}, attempts=PLACE_ATTEMPTS))
    if as_json:
        print_json(accepted)
    else:
        typer.echo(accepted["order_id"])
