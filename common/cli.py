"""The `shop` command: runs the services and mounts each service's own commands."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import signal
import sys
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table
from yarl import URL

from common.broker import connect, safe_url
from common.dlq_cli import app as dlq_app
from common.logging import get_logger
from common.settings import ServiceSettings
from common.topology import Topology
from inventory_service.cli import app as inventory_app
from logistics_service.cli import app as logistics_app
from order_service.cli import app as order_app
from seller_service.cli import app as seller_app

app = typer.Typer(
    help="A choreographed order platform on RabbitMQ: run it, place orders, watch the flow.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(order_app, name="order", help="Place orders and see who handled them.")
app.add_typer(inventory_app, name="inventory", help="Stock levels (the inventory service).")
app.add_typer(logistics_app, name="logistics", help="Shipments (the logistics service).")
app.add_typer(seller_app, name="seller", help="Sellers' inboxes (the seller service).")
app.add_typer(dlq_app, name="dlq", help="Dead letters: list, show, replay, purge.")

console = Console()
log = get_logger(__name__)
err = Console(stderr=True)


class ServiceName(StrEnum):
    order = "order"
    inventory = "inventory"
    logistics = "logistics"
    seller = "seller"


SERVICES = [s.value for s in ServiceName]
_COLOURS = {"order": "cyan", "inventory": "green", "logistics": "magenta", "seller": "yellow"}


@app.command()
def run(service: Annotated[ServiceName, typer.Argument(help="Which service to run.")]) -> None:
    """Run one service in the foreground (the same as `python -m <service>_service`)."""
    module = importlib.import_module(f"{service.value}_service.__main__")
    module.main()


@app.command()
def up(
    broker_wait: Annotated[float, typer.Option(help="Seconds to wait for RabbitMQ.")] = 60.0,
    stop_timeout: Annotated[float, typer.Option(help="Seconds each service gets to stop.")] = 15.0,
) -> None:
    """Run all four services as separate processes, their logs interleaved.

    Ctrl-C or SIGTERM stops them all cleanly.
    """
    settings = ServiceSettings()
    err.print(f"waiting for RabbitMQ at {safe_url(settings.amqp_url)} ...")
    try:
        asyncio.run(_check_broker(settings.amqp_url, broker_wait))
    except ConnectionError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    err.print("RabbitMQ answers; starting the services (Ctrl-C stops them)")
    raise typer.Exit(asyncio.run(_supervise(stop_timeout)))


async def _check_broker(url: str, wait: float) -> None:
    connection = await connect(url, "shop-up", wait=wait)
    await connection.close()


async def _supervise(stop_timeout: float) -> int:
    env = dict(os.environ)
    if sys.stdout.isatty():
        env.setdefault("LOG_FORMAT", "console")
    children: dict[str, asyncio.subprocess.Process] = {}
    for name in SERVICES:
        children[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"{name}_service", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
    width = max(map(len, SERVICES))
    pumps = [asyncio.create_task(_pump(name, proc, width)) for name, proc in children.items()]
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    exits = {name: asyncio.create_task(proc.wait()) for name, proc in children.items()}
    stop_task = asyncio.create_task(stopping.wait())
    done, _ = await asyncio.wait({stop_task, *exits.values()},
                                 return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if stop_task not in done:
        dead = [n for n, t in exits.items() if t in done]
        err.print(f"[red]{', '.join(dead)} exited on its own; stopping the others[/red]")
        code = 1
    for proc in children.values():
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    _, pending = await asyncio.wait(exits.values(), timeout=stop_timeout)
    for name, task in exits.items():
        if task in pending:
            err.print(f"[red]{name} did not stop within {stop_timeout:.0f} s; killing it[/red]")
            with contextlib.suppress(ProcessLookupError):
                children[name].kill()
            code = 1
    await asyncio.gather(*exits.values())
    await asyncio.gather(*pumps)
    stop_task.cancel()
    err.print("all services stopped")
    return code


async def _pump(name: str, proc: asyncio.subprocess.Process, width: int) -> None:
    if proc.stdout is None:
        return
    prefix = typer.style(f"{name:<{width}} | ", fg=_COLOURS.get(name, "white"), bold=True)
    async for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        sys.stdout.write(prefix + line + "\n")
        sys.stdout.flush()


@app.command()
def queues(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Every queue of the system: ready and unacked messages, consumers, dead letters."""
    settings = ServiceSettings()
    try:
        rows, source = _queues_from_management(settings), "management API"
    except (httpx.HTTPError, ValueError) as exc:
        err.print(f"management API not reachable ({exc}); using AMQP passive declares, "
                  "which cannot count unacked messages")
        rows, source = asyncio.run(_queues_from_amqp(settings)), "amqp"
    if as_json:
        console.print_json(json.dumps({"source": source, "queues": rows}))
        return
    table = Table(title=f"queues ({source})")
    for column in ("queue", "ready", "unacked", "consumers", "dead letters"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for row in rows:
        style = "red" if row["consumers"] == 0 or (row["dead_letters"] or 0) > 0 else None
        table.add_row(row["queue"], _fmt(row["ready"]), _fmt(row["unacked"]),
                      _fmt(row["consumers"]), _fmt(row["dead_letters"]), style=style)
    console.print(table)


def _fmt(value: object) -> str:
    return "-" if value is None else str(value)


def _system_queue_names(settings: ServiceSettings) -> list[str]:
    """The queues the four services declare, from their handler tables."""
    topology = Topology(settings.name_prefix)
    names = [topology.audit_queue]
    for name in SERVICES:
        spec = importlib.import_module(f"{name}_service.__main__").SPEC
        names += [topology.queue(spec.name, cls) for cls in spec.handlers]
    return sorted(names)


_COLUMNS = "name,messages_ready,messages_unacknowledged,consumers"


def _queues_from_management(settings: ServiceSettings) -> list[dict[str, Any]]:
    url = URL(settings.management_url)
    auth = (url.user or "guest", url.password or "guest")
    base = str(url.with_user(None).with_password(None)).rstrip("/")
    vhost = URL(settings.amqp_url).path.lstrip("/") or "/"
    response = httpx.get(f"{base}/api/queues/{quote(vhost, safe='')}",
                         params={"columns": _COLUMNS},
                         auth=auth, timeout=5)
    response.raise_for_status()
    by_name = {q["name"]: q for q in response.json()}
    prefix = settings.name_prefix
    wanted = set(_system_queue_names(settings))
    # Also every other queue under our prefix: a subscriber service added later.
    wanted |= {n for n in by_name if n.startswith(prefix) and not n.endswith(".dlq")
               and (prefix or "." in n) and f"{n}.dlq" in by_name}
    rows = []
    for name in sorted(wanted):
        q = by_name.get(name)
        dlq = by_name.get(f"{name}.dlq")
        rows.append({
            "queue": name,
            "ready": q.get("messages_ready") if q else None,
            "unacked": q.get("messages_unacknowledged") if q else None,
            "consumers": q.get("consumers") if q else None,
            "dead_letters": dlq.get("messages_ready") if dlq else None,
            "exists": q is not None,
        })
    return rows


async def _queues_from_amqp(settings: ServiceSettings) -> list[dict[str, Any]]:
    connection = await connect(settings.amqp_url, "shop-queues", wait=5)
    rows = []
    try:
        for name in _system_queue_names(settings):
            row: dict[str, Any] = {"queue": name, "ready": None, "unacked": None,
                                   "consumers": None, "dead_letters": None, "exists": False}
            for target, key in ((name, "ready"), (f"{name}.dlq", "dead_letters")):
                channel = await connection.channel()
                try:
                    declared = await channel.declare_queue(target, passive=True)
                except Exception:  # passive declare of a missing queue closes the channel
                    log.debug("queue not found", queue=target)
                    continue
                result = declared.declaration_result
                row[key] = result.message_count
                if key == "ready":
                    row["consumers"] = result.consumer_count
                    row["exists"] = True
                with contextlib.suppress(Exception):
                    await channel.close()
            rows.append(row)
    finally:
        await connection.close()
    return rows


def main() -> None:
    app()


if __name__ == "__main__":
    main()
