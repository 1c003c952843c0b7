"""Bootstrap and run the inventory service: `python -m inventory_service`."""

from __future__ import annotations

import asyncio
import dataclasses

from common.events import StockReservationFailed, StockReserved
from common.kit.logging import configure_logging
from common.kit.runner import run_service
from common.kit.service import ServiceSpec
from inventory_service.handlers import HANDLERS, SERVICE_NAME
from inventory_service.settings import InventorySettings
from inventory_service.store import StockStore, metadata, seed_catalogue

SPEC = ServiceSpec(
    name=SERVICE_NAME,
    handlers=HANDLERS,
    store=StockStore,
    metadata=metadata,
    produces=(StockReserved, StockReservationFailed),
    on_start=seed_catalogue,
)


def spec_for(settings: InventorySettings) -> ServiceSpec[StockStore]:
    """SPEC, without the demo seed when the settings turn it off."""
    return SPEC if settings.seed_catalogue else dataclasses.replace(SPEC, on_start=None)


def main() -> None:
    settings = InventorySettings()
    configure_logging(settings)
    asyncio.run(run_service(spec_for(settings), settings))


if __name__ == "__main__":
    main()
