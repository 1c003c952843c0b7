"""`/subscribers`: the registry the subscribers' announcements build, and retiring one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from sqlalchemy.ext.asyncio import AsyncConnection

from order_service.api.access import operator_only
from order_service.api.dependencies import Running, Settings
from order_service.api.errors import Problem
from order_service.domain.views import Subscriber
from order_service.store import OrderStore

router = APIRouter()


@router.get("/subscribers", response_model=list[Subscriber], summary="The subscriber registry")
async def list_subscribers(rt: Running) -> list[Subscriber]:
    """Every subscriber that announced itself, and what it consumes."""
    async with rt.engine.connect() as conn:
        return await OrderStore(conn).list_subscribers()


@router.delete("/subscribers/{name}", response_model=Subscriber,
               dependencies=[Depends(operator_only)],
               responses={401: {"model": Problem, "description": "No operator token, or "
                                                                 "not a valid one."},
                          403: {"model": Problem, "description": "Operator actions are off "
                                                                 "(no SHOP_OPERATOR_TOKEN), "
                                                                 "or the API token was sent."},
                          404: {"model": Problem, "description": "Not registered."},
                          409: {"model": Problem, "description": "Still announcing itself."}},
               summary="Retire a subscriber (an operator action)")
async def retire_subscriber(
    name: str,
    rt: Running,
    settings: Settings,
    force: Annotated[bool, Query(description="Retire it even though it announced itself "
                                             "recently (it registers again at its next "
                                             "announcement if it still runs).")] = False,
) -> Subscriber:
    """Take a subscriber that was shut down for good out of the registry, so orders
    placed from now on stop expecting it (and stop showing it late). Orders placed
    before keep whom they expected. Its queue stays on the broker, still bound and
    filling: `GET /system` then reports it as unannounced until it is deleted.

    Refused while the subscriber still announces itself (within two announcement
    intervals), unless `force`. Needs the operator token (`SHOP_OPERATOR_TOKEN`).
    """
    now = datetime.now(UTC)
    recent_within = timedelta(seconds=2 * settings.announce_interval)

    async def retire(conn: AsyncConnection) -> tuple[Subscriber | None, bool]:
        """The entry as it was, and whether it was retired (in one transaction, so an
        announcement cannot slip between the check and the removal)."""
        store = OrderStore(conn)
        entry = await store.subscriber(name)
        if entry is None or not (force or now - entry.last_seen >= recent_within):
            return entry, False
        await store.retire_subscriber(name)
        return entry, True

    entry, retired = await rt.commits.run(retire)
    if entry is None:
        raise HTTPException(404, f"no subscriber named {name!r} is registered")
    if not retired:
        ago = (now - entry.last_seen).total_seconds()
        raise HTTPException(409, f"subscriber {name!r} announced itself {ago:.0f} s ago "
                                 f"(instance {entry.instance}): it still runs and "
                                 "would register again; stop it first, or retire it "
                                 "with force=true")
    return entry
