"""The live web page (`GET /`): one static HTML file that polls the service's JSON endpoints."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

router = APIRouter()

# The page runs only its own inline script and talks only to the service that served it.
_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


@cache
def _html() -> str:
    # Shipped as package data (pyproject's [tool.setuptools.package-data]).
    return files("order_service").joinpath("web/index.html").read_text(encoding="utf-8")


def index_page() -> HTMLResponse:
    """The page, read from the package once per process."""
    return HTMLResponse(_html(), headers=_HEADERS)


@router.get("/", include_in_schema=False)
async def page() -> Response:
    """The live page: recent orders, a light per subscriber, queues, problems."""
    return index_page()
