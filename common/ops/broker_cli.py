"""`shop broker setup`: a broker user per service, with least-privilege permissions."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from common.kit import discovery
from common.kit.broker import safe_url
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops.access import SetupError, apply, declare_shared, grant_for
from common.ops.cli_support import fail, print_json

app = typer.Typer(no_args_is_help=True)


@app.command()
def setup(
    services: Annotated[list[str] | None, typer.Argument(
        help="Which services (default: every one).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Create or update each service's broker user and its permissions, and declare the
    queue the kit shares (the tracker's).

    Run it as an administrator: AMQP_URL and RABBITMQ_MANAGEMENT_URL carry the
    administrator's credentials, each service's password comes from
    <SERVICE>_BROKER_PASSWORD (the same variable the service reads). The user of a service is
    its name under SHOP_NAME_PREFIX. Idempotent: run it again after adding a service or
    changing a password. The administrator is tagged `impersonator`, so that `shop dlq
    replay` sends a dead letter back as its producer sent it.
    """
    admin = ServiceSettings()
    topology = Topology(admin.name_prefix)
    installed = discovery.services()
    unknown = sorted(set(services or ()) - set(installed))
    if unknown:
        raise fail(f"unknown service {', '.join(unknown)}; one of {', '.join(installed)}")
    # Each service's settings read from the environment as the service reads them.
    found = {name: (service, service.settings()) for name, service in installed.items()
             if not services or name in services}
    grants = [grant_for(service.spec(settings), topology, observer=bool(service.tracked))
              for service, settings in found.values()]
    passwords = {name: settings.broker_password.get_secret_value()
                 for name, (_service, settings) in found.items()
                 if settings.broker_password is not None}
    try:
        done = asyncio.run(apply(admin, grants, passwords))
        asyncio.run(declare_shared(admin, topology))
    except SetupError as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # the broker away or refusing: say where, and why
        raise fail(f"could not set up the broker at {safe_url(admin.management_url)}: "
                   f"{type(exc).__name__}: {exc}") from None
    done.append(f"declared {topology.audit_queue} (the tracker's queue)")
    if as_json:
        print_json({"users": [g.summary() for g in grants], "done": done})
        return
    table = Table("service", "user", "configure", "write", "read", title="broker users")
    for grant in grants:
        table.add_row(*(Text(v) for v in (grant.service, grant.user, grant.configure,
                                          grant.write, grant.read)))
    console = Console()
    console.print(table)
    for line in done:
        console.print(Text(line))
