"""`GET /asyncapi.json`: the event contracts, as `shop events asyncapi` prints them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from common.contracts import asyncapi
from common.kit import discovery
from common.kit.declare import Service
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology


def asyncapi_router(settings: ServiceSettings,
                    services: Callable[[], Mapping[str, Service[Any]]] = discovery.services
                    ) -> APIRouter:
    """The route, over the services installed.

    The document is made on the first request and kept: the services installed do not
    change while the process runs.
    """
    router = APIRouter()

    @functools.cache
    def document() -> dict[str, Any]:
        return asyncapi(services().values(), Topology(settings.name_prefix),
                        broker_url=settings.amqp_url)

    @router.get("/asyncapi.json", summary="The event contracts (AsyncAPI 3.0)",
                response_description="An AsyncAPI 3.0.0 document.")
    async def asyncapi_document() -> JSONResponse:
        """Every exchange, subscriber queue and message schema, and who produces and who
        consumes each event."""
        return JSONResponse(document())

    return router
