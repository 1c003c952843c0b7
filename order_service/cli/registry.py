"""`shop order subscribers|retire`: the subscriber registry, and retiring a subscriber."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

import typer
from rich.table import Table
from rich.text import Text

from common.ops.cli_support import plain_console, print_json
from order_service.cli.client import BAD_INPUT, DEFAULT_API, Api, AsJson, check, fail, request, when


def subscribers(api: Api = DEFAULT_API, as_json: AsJson = False) -> None:
    """The subscriber registry: every service that announced itself, and what it consumes."""
    entries = check(request(api, "GET", "/subscribers"))
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
                      when(s["first_seen"]), when(s["last_seen"]))
    plain_console().print(table)


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
        fail("the subscriber's name is empty", BAD_INPUT)
    entry = check(request(api, "DELETE", f"/subscribers/{quote(name, safe='')}",
                          params={"force": "true"} if force else None, operator=True))
    if as_json:
        print_json(entry)
        return
    queues = ", ".join(sorted(entry["consumes"].values()))
    plain_console().print(Text.assemble(
        "retired ", (entry["name"], "bold"),
        f": orders placed from now on do not expect it. Its queue(s) {queues} still receive "
        "events: delete them (`rabbitmqctl delete_queue <name>`) when it is gone for good."))
