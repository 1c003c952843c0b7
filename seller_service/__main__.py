"""Bootstrap and run the seller service: `python -m seller_service`."""

from __future__ import annotations

import asyncio

from common.events import SellerNotified
from common.kit.logging import configure_logging
from common.kit.runner import run_service
from common.kit.service import ServiceSpec
from seller_service.handlers import HANDLERS, SERVICE_NAME
from seller_service.settings import SellerSettings
from seller_service.store import InboxStore, metadata

SPEC = ServiceSpec(name=SERVICE_NAME, handlers=HANDLERS, store=InboxStore, metadata=metadata,
                   produces=(SellerNotified,))


def main() -> None:
    settings = SellerSettings()
    configure_logging(settings)
    asyncio.run(run_service(SPEC, settings))


if __name__ == "__main__":
    main()
