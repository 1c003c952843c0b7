"""The order API assembled: its routers behind its checks, and served beside the consumers."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.ops.system_report import SystemReport
from order_service.api import health, orders, page, subscribers, system
from order_service.api.access import PROBE, ApiToken, HostCheck, declare_api_token
from order_service.api.asyncapi import asyncapi_router
from order_service.api.body_limit import BodyLimit
from order_service.api.dependencies import OrderRuntime
from order_service.api.errors import http_problem, invalid_request
from order_service.api.server import Server, server_config
from order_service.settings import OrderSettings
from order_service.tracker import settle_forever


class _Api(FastAPI):
    """FastAPI, with the API token declared in the OpenAPI document when one guards it."""

    #: When a token guards the API: the paths open without it.
    open_paths: frozenset[str] | None = None

    def openapi(self) -> dict[str, Any]:
        fresh = self.openapi_schema is None
        schema = super().openapi()
        if fresh and self.open_paths is not None:
            declare_api_token(schema, self.open_paths)
        return schema


def create_app(runtime: OrderRuntime | None, settings: OrderSettings) -> FastAPI:
    """The API over a running service; with `runtime=None` only the docs work (503 else)."""
    app = _Api(
        title="Order service",
        version="1.0",
        description="Place orders and follow their fan-out: which subscribers handled each "
                    "order's OrderPlaced, which failed and why, and the domain outcomes.",
    )
    # What the routes read: the service and its settings (order_service.api.dependencies),
    # and the last system report, kept for a second.
    app.state.runtime = runtime
    app.state.settings = settings
    app.state.system_report = system.Recent[SystemReport]()
    open_paths = {"/", PROBE, *(path for path in (app.docs_url, app.redoc_url, app.openapi_url,
                                                  app.swagger_ui_oauth2_redirect_url) if path)}
    if settings.api_token is not None:
        app.open_paths = frozenset(open_paths)
    # The last added runs first: the Host, then the token, before a body is read.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.exception_handler(RequestValidationError)(invalid_request)
    app.exception_handler(StarletteHTTPException)(http_problem)
    app.add_middleware(ApiToken, api=settings.api_token, operator=settings.operator_token,
                       open_paths=open_paths)
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts)
    routers = (page.router, orders.router, subscribers.router, system.router, health.router,
               asyncapi_router(settings))
    # Every route, the docs' and the routers': recent FastAPI keeps an included router's
    # routes in it rather than in the application's list, and a 405 names them all.
    app.state.routes = [*app.router.routes, *(route for r in routers for route in r.routes)]
    for router in routers:
        app.include_router(router)
    return app


async def serve_api(runtime: OrderRuntime) -> None:
    """Serve the API inside the running loop until cancelled, then shut down gracefully."""
    settings = runtime.settings
    if not isinstance(settings, OrderSettings):
        raise TypeError(f"serve_api needs OrderSettings, got {type(settings).__name__}")
    server = Server(server_config(create_app(runtime, settings), settings))
    serving = asyncio.create_task(_serve(server, f"{settings.http_host}:{settings.http_port}"))
    # The late-orders reads the API answers look only at orders not settled yet.
    settling = asyncio.create_task(settle_forever(
        runtime.commits, timedelta(seconds=settings.late_after),
        every=max(1.0, settings.late_after)))
    try:
        # Shielded so a cancellation lets uvicorn finish open requests and close its socket.
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        await serving
        raise
    finally:
        settling.cancel()


async def _serve(server: uvicorn.Server, where: str) -> None:
    try:
        await server.serve()
    except SystemExit as exc:
        # uvicorn calls sys.exit() when it cannot bind; inside a task that would escape
        # the event loop, so turn it into an ordinary error the runner reports.
        raise RuntimeError(f"the HTTP API could not start on {where} "
                           "(is the port already in use?)") from exc
