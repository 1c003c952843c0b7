"""The live page's route and packaging: `GET /` serves the static page, and wheels ship it."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import httpx
import pytest

from order_service.api.app import create_app
from order_service.settings import OrderSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "order_service" / "web"


async def test_the_page_is_served_at_the_root_without_a_running_service(tmp_path: Path) -> None:
    """GET / answers the HTML page even before the service runs, limited to its own origin,
    and stays out of the OpenAPI spec."""
    app = create_app(None, OrderSettings(data_dir=tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://localhost") as client:
        response = await client.get("/")
        spec = (await client.get("/openapi.json")).json()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == (WEB / "index.html").read_text(encoding="utf-8")
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    assert "/" not in spec["paths"]


def test_every_file_of_the_page_is_package_data() -> None:
    """pyproject ships every file under order_service/web/ in the wheel (the Docker image
    installs from one), and finds the folder as a package."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = config["tool"]["setuptools"]
    assert any(fnmatch.fnmatchcase("order_service.web", pattern)
               for pattern in setuptools["packages"]["find"]["include"])
    patterns = setuptools["package-data"]["order_service.web"]
    files = [p.relative_to(WEB).as_posix() for p in WEB.rglob("*") if p.is_file()]
    assert files
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not unshipped, f"not in [tool.setuptools.package-data]: {unshipped}"
