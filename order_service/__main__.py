"""Run the order service: its consumers, its outbox relay and its HTTP API."""

from __future__ import annotations

import asyncio
import sys

from pydantic import ValidationError

from common.events import OrderPlaced
from common.kit.logging import configure_logging
from common.kit.runner import run_service
from common.kit.service import ServiceSpec
from order_service.api import serve_api
from order_service.handlers import AUDIT_HANDLERS, HANDLERS
from order_service.settings import OrderSettings, refusal
from order_service.store import OrderStore, metadata, upgrade_schema

SPEC = ServiceSpec(
    name="order",
    handlers=HANDLERS,
    store=OrderStore,
    metadata=metadata,
    produces=(OrderPlaced,),
    on_start=upgrade_schema,
    audit_handlers=AUDIT_HANDLERS,
    keep_receipts=OrderStore.record_deliveries,
)


def main() -> None:
    """Entry point of `python -m order_service` and `shop run order`."""
    try:
        settings = OrderSettings()
    except ValidationError as exc:
        sys.exit(f"the order service refuses to start:\n{refusal(exc)}")
    configure_logging(settings)
    asyncio.run(run_service(SPEC, settings, extra=serve_api))


if __name__ == "__main__":
    main()
