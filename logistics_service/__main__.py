"""Bootstrap and run the logistics service: `python -m logistics_service`."""

from __future__ import annotations

import asyncio

from common.events import ShipmentScheduled
from common.kit.logging import configure_logging
from common.kit.runner import run_service
from common.kit.service import ServiceSpec
from logistics_service.handlers import HANDLERS, SERVICE_NAME
from logistics_service.settings import LogisticsSettings
from logistics_service.store import ShipmentStore, metadata

SPEC = ServiceSpec(name=SERVICE_NAME, handlers=HANDLERS, store=ShipmentStore, metadata=metadata,
                   produces=(ShipmentScheduled,))


def main() -> None:
    settings = LogisticsSettings()
    configure_logging(settings)
    asyncio.run(run_service(SPEC, settings))


if __name__ == "__main__":
    main()
