"""`shop doctor`: is the running system well? A checklist for people, an exit code for cron.

The broker side is checked from here (AMQP, then the management API or passive declares);
the registry of subscribers and the late orders come from the order API (`SHOP_API_URL`).
When the order API does not answer that is a failed check of its own, and the installed
services' queues are checked instead of the registry's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import httpx
import typer
from aio_pika.abc import AbstractRobustConnection
from rich.console import Console
from rich.text import Text

from common.kit.broker import connect, safe_url
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops import observe, system_report
from common.ops.cli_support import plain_console
from common.ops.credentials import API_TOKEN_VAR, ApiCredentials

Status = Literal["ok", "failed", "unknown"]

DEFAULT_API = "http://127.0.0.1:8000"
#: Late orders asked for at most (the order API's largest page); more are reported as
#: "at least".
LATE_LIMIT = 200
#: Items listed in one check's detail before "and N more".
SHOWN = 10

_MARKS = {"ok": ("✓", "green"), "failed": ("✗", "red"), "unknown": ("?", "yellow")}


@dataclass(frozen=True)
class Check:
    """One line of the checklist: ok, failed, or unknown (it could not be checked)."""

    name: str
    status: Status
    detail: str
    items: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail,
                "items": list(self.items)}


@dataclass
class Diagnosis:
    """Every check, and the comparison they come from."""

    checked_at: datetime
    checks: list[Check] = field(default_factory=list)
    report: system_report.SystemReport | None = None

    @property
    def healthy(self) -> bool:
        return all(c.status != "failed" for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "checked_at": self.checked_at.isoformat(),
                "checks": [c.as_dict() for c in self.checks],
                "report": None if self.report is None else self.report.model_dump(mode="json")}


@dataclass(frozen=True)
class FromApi:
    """What the order API said: the registry and the late orders, or why it did not."""

    registry: list[system_report.Announced] | None
    late: list[dict[str, Any]] | None
    error: str | None


async def read_api(api: str, client: httpx.AsyncClient | None = None,
                   headers: Mapping[str, str] | None = None) -> FromApi:
    """The registry (`GET /subscribers`) and the late orders (`GET /orders?late=true`);
    `headers` carry the API token when there is one."""
    own = client is None
    http = client or httpx.AsyncClient(base_url=api, timeout=10.0)
    try:
        subscribers = await http.get("/subscribers", headers=headers)
        subscribers.raise_for_status()
        late = await http.get("/orders", params={"late": "true", "limit": LATE_LIMIT},
                              headers=headers)
        late.raise_for_status()
        registry = [system_report.Announced(name=s["name"], consumes=s["consumes"],
                                      last_seen=datetime.fromisoformat(s["last_seen"]))
                    for s in subscribers.json()]
        return FromApi(registry=registry, late=list(late.json()), error=None)
    except httpx.ConnectError:
        return FromApi(None, None, f"cannot reach the order API at {api}: is the order service "
                                   "running? (shop up)")
    except httpx.HTTPStatusError as exc:
        hint = (f" (set {API_TOKEN_VAR} to the service's token)"
                if exc.response.status_code == 401 else "")
        return FromApi(None, None, f"the order API at {api} answered "
                                   f"{exc.response.status_code} to {exc.request.url.path}{hint}")
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return FromApi(None, None, f"the order API at {api} failed: {type(exc).__name__}: {exc}")
    finally:
        if own:
            await http.aclose()


def _listed(items: Sequence[str]) -> tuple[str, ...]:
    shown = tuple(items[:SHOWN])
    return shown + ((f"... and {len(items) - SHOWN} more",) if len(items) > SHOWN else ())


async def diagnose(settings: ServiceSettings, api: str, *, amqp_wait: float = 3.0,
                   client: httpx.AsyncClient | None = None,
                   headers: Mapping[str, str] | None = None) -> Diagnosis:
    """Run every check; never raises for what it finds, only reports it."""
    now = datetime.now(UTC)
    diagnosis = Diagnosis(checked_at=now)
    checks = diagnosis.checks
    prefix = settings.name_prefix

    connection: AbstractRobustConnection | None = None
    try:
        connection = await connect(settings.amqp_url, "shop-doctor", wait=amqp_wait)
        checks.append(Check("broker reachable (AMQP)", "ok", safe_url(settings.amqp_url)))
    except ConnectionError as exc:
        checks.append(Check("broker reachable (AMQP)", "failed", str(exc)))

    from_api = await read_api(api, client, headers)
    if from_api.error is None and from_api.registry is not None:
        checks.append(Check("order API answers", "ok",
                            f"{api}: {len(from_api.registry)} subscriber(s) registered"))
    else:
        checks.append(Check("order API answers", "failed", from_api.error or "no answer"))

    registry = from_api.registry
    # Without the registry, the installed services' queues are what is expected.
    kit = ([Topology(prefix).audit_queue] if registry is not None
           else observe.system_queue_names(prefix))
    expected = {q for s in registry or () for q in s.consumes.values()} | set(kit)
    try:
        snapshot = await observe.read_broker(settings, sorted(expected),
                                             exchanges=observe.event_exchanges(prefix),
                                             connection=connection, current=True)
    finally:
        if connection is not None:
            await connection.close()
    late = from_api.late
    report = system_report.compare(snapshot, registry, prefix=prefix, now=now,
                                   announce_interval=settings.announce_interval,
                                   late_orders=len(late or ()), kit_queues=kit)
    diagnosis.report = report

    if snapshot.source == observe.MANAGEMENT:
        checks.append(Check("management API answers", "ok",
                            f"{observe.ManagementApi.of(settings).base}: queues and bindings"))
    else:
        checks.append(Check("management API answers", "unknown", snapshot.error or ""))

    checks.append(_consumed(snapshot, report, registry is not None, kit, prefix))
    checks.append(_dead_letters(snapshot, report))
    checks.append(_late(late))
    checks.append(_unannounced(snapshot, report, registry is not None))
    checks.append(_stale(report, registry is not None, settings.announce_interval))
    return diagnosis


def _consumed(snapshot: observe.BrokerSnapshot, report: system_report.SystemReport,
              registry_known: bool, kit: Sequence[str], prefix: str) -> Check:
    name = "every expected queue has a consumer"
    if not snapshot.reachable:
        return Check(name, "unknown", "the broker cannot be read")
    rows = {q.queue: q for q in report.queues}
    queues: dict[str, tuple[str, bool, int | None]] = {}
    for sub in report.subscribers:
        for q in sub.queues:
            queues[q.queue] = (sub.name, q.exists, q.consumers)
    for queue in kit:
        if queue not in queues and queue in rows:
            owner = queue.removeprefix(prefix).split(".", 1)[0]
            queues[queue] = (owner, rows[queue].exists, rows[queue].consumers)
    wrong = []
    for queue, (owner, exists, consumers) in sorted(queues.items()):
        whose = f" ({owner})" if owner else ""
        if not exists:
            wrong.append(f"{queue}{whose} does not exist")
        elif consumers == 0:
            wrong.append(f"{queue}{whose} has no consumer")
    scope = "" if registry_known else " (registry unknown: the installed services' queues)"
    if wrong:
        return Check(name, "failed", f"{len(wrong)} of {len(queues)} queue(s){scope}",
                     _listed(wrong))
    return Check(name, "ok", f"{len(queues)} queue(s), each consumed{scope}")


def _dead_letters(snapshot: observe.BrokerSnapshot, report: system_report.SystemReport) -> Check:
    name = "no dead letters waiting"
    if not snapshot.reachable:
        return Check(name, "unknown", "the broker cannot be read")
    waiting = [f"{q.dead_letters} in {observe.dead_letter_queue(q.queue)}"
               for q in report.queues if q.dead_letters]
    if waiting:
        return Check(name, "failed", f"{report.dead_letters} dead letter(s): see shop dlq list "
                                     "SERVICE", _listed(waiting))
    return Check(name, "ok", "every dead-letter queue is empty")


def _late(late: list[dict[str, Any]] | None) -> Check:
    name = "no late orders"
    if late is None:
        return Check(name, "unknown", "the order API did not answer")
    if late:
        more = "at least " if len(late) >= LATE_LIMIT else ""
        items = [f"{o['order_id']}: "
                 + ", ".join(s["name"] for s in o.get("subscribers", ()) if s["status"] == "late")
                 for o in late]
        return Check(name, "failed", f"{more}{len(late)} late order(s) (shop order status ID)",
                     _listed(items))
    return Check(name, "ok", "every expected subscriber answered in time")


def _unannounced(snapshot: observe.BrokerSnapshot, report: system_report.SystemReport,
                 registry_known: bool) -> Check:
    name = "no unannounced queue"
    if not registry_known:
        return Check(name, "unknown", "the registry is unknown (order API)")
    if snapshot.bindings is None:
        return Check(name, "unknown", "the bindings need the management API")
    if report.unannounced_queues:
        return Check(name, "failed", "bound to an event exchange, announced by nobody",
                     _listed([f"{u.queue} on {u.exchange}" for u in report.unannounced_queues]))
    return Check(name, "ok", "every queue bound to an event exchange was announced")


def _stale(report: system_report.SystemReport, registry_known: bool, interval: float) -> Check:
    name = "no stale subscriber"
    if not registry_known:
        return Check(name, "unknown", "the registry is unknown (order API)")
    stale = [f"{s.name}: last announced {s.last_seen.isoformat() if s.last_seen else '?'}"
             for s in report.subscribers if s.stale]
    limit = f"{system_report.STALE_AFTER_INTERVALS} x {interval:g} s"
    if stale:
        return Check(name, "failed", f"no announcement for more than {limit}", _listed(stale))
    return Check(name, "ok", f"every subscriber announced itself within {limit}")


def print_checklist(diagnosis: Diagnosis, console: Console) -> None:
    """The checklist for people. Text throughout: a check's detail and items quote the
    broker and the API (queue names, errors), never to be read as markup."""
    failed = sum(1 for c in diagnosis.checks if c.status == "failed")
    verdict = (("healthy", "green") if diagnosis.healthy
               else (f"{failed} check(s) failed", "red"))
    console.print(Text.assemble(("shop doctor", "bold"), ": ", verdict), soft_wrap=True)
    for check in diagnosis.checks:
        console.print(Text.assemble(" ", _MARKS[check.status], f" {check.name}: {check.detail}"),
                      soft_wrap=True, highlight=False)
        for item in check.items:
            console.print(Text(f"     {item}"), soft_wrap=True, highlight=False)


def doctor(
    api: Annotated[str, typer.Option("--api", envvar="SHOP_API_URL", show_envvar=True,
                                     help="The order service's base URL.")] = DEFAULT_API,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Check the running system: broker, consumers, dead letters, late orders, unannounced
    queues, stale subscribers.

    Exits 1 when a check fails, so it can run from cron or as a health check.
    """
    diagnosis = asyncio.run(diagnose(ServiceSettings(), api,
                                     headers=ApiCredentials().headers()))
    if as_json:
        typer.echo(json.dumps(diagnosis.as_dict(), indent=2))
    else:
        print_checklist(diagnosis, plain_console())
    if not diagnosis.healthy:
        raise typer.Exit(1)
