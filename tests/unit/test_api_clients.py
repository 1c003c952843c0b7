"""`shop order` and `shop doctor` as clients of the order API: pages followed, tokens sent,
refusals explained (fake HTTP)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from order_service import cli

pytestmark = pytest.mark.unit

API_TOKEN = "api-token-0123456789abcdef"
OPERATOR_TOKEN = "operator-token-0123456789abcdef"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], list[httpx.Request]]:
    """Install a fake API answering with a handler; returns the requests it got."""
    for name in ("SHOP_API_URL", "SHOP_API_TOKEN", "SHOP_OPERATOR_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    def install(handler: Handler) -> list[httpx.Request]:
        requests: list[httpx.Request] = []

        def handle(request: httpx.Request) -> httpx.Response:
            requests.append(request)
            return handler(request)

        monkeypatch.setattr(cli, "make_client", lambda base_url: httpx.Client(
            base_url=base_url, transport=httpx.MockTransport(handle)))
        return requests

    return install


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.app, list(args), env=env)


def summaries(start: int, count: int) -> list[dict[str, Any]]:
    return [{"order_id": str(uuid.UUID(int=n)), "customer_id": "c", "currency": "EUR",
             "total": "1.00", "placed_at": "2025-01-01T12:00:00Z", "state": "placed",
             "handled": 1, "failed": 0, "pending": 0} for n in range(start, start + count)]


def paged(total: int) -> Handler:
    """An API of `total` orders, whose cursor is the index of the next one."""
    def handle(request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params["limit"])
        assert limit <= cli.PAGE
        start = int(request.url.params.get("cursor", "0"))
        end = min(total, start + limit)
        headers = ({"Link": f'</orders?limit={limit}&cursor={end}>; rel="next"'}
                   if end < total else {})
        return httpx.Response(200, json=summaries(start, end - start), headers=headers)
    return handle


def test_list_follows_the_pages_and_says_where_to_go_on(
        sent: Callable[[Handler], list[httpx.Request]]) -> None:
    """--limit 250 over 300 orders: a page of 200 and one of 50, all listed; the cursor to
    go on with goes to stderr; --cursor starts there."""
    requests = sent(paged(300))
    result = run("list", "--limit", "250", "--json")
    assert result.exit_code == 0, result.output
    assert [o["order_id"] for o in json.loads(result.stdout)] == [
        o["order_id"] for o in summaries(0, 250)]
    assert [dict(r.url.params) for r in requests] == [
        {"limit": "200"}, {"limit": "50", "cursor": "200"}]
    assert "shop order list --cursor 250" in result.stderr

    requests.clear()
    result = run("list", "--cursor", "250")
    assert result.exit_code == 0, result.output
    assert [dict(r.url.params) for r in requests] == [{"limit": "50", "cursor": "250"}]
    assert result.stderr == ""
