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

from common.ops.doctor import read_api
from order_service import cli
from order_service.cli import client
from order_service.cli import orders as order_commands

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

        monkeypatch.setattr(client, "make_client", lambda base_url: httpx.Client(
            base_url=base_url, transport=httpx.MockTransport(handle)))
        return requests

    return install


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.app, list(args), env=env)


SUBSCRIBER = {"name": "old", "consumes": {"OrderPlaced": "old.order.placed"}, "instance": "h:1",
              "first_seen": "2025-01-01T12:00:00Z", "last_seen": "2025-01-01T12:00:00Z"}


def test_commands_send_the_api_token_and_retire_the_operator_token(
        sent: Callable[[Handler], list[httpx.Request]]) -> None:
    """SHOP_API_TOKEN goes with every call, SHOP_OPERATOR_TOKEN with the operator action;
    with only the operator token set, the ordinary calls send it (the API accepts it)."""
    requests = sent(lambda r: httpx.Response(200, json=[] if r.method == "GET" else SUBSCRIBER))
    both = {"SHOP_API_TOKEN": API_TOKEN, "SHOP_OPERATOR_TOKEN": OPERATOR_TOKEN}
    assert run("list", env=both).exit_code == 0
    assert run("retire", "old", env=both).exit_code == 0
    assert run("list", env={"SHOP_OPERATOR_TOKEN": OPERATOR_TOKEN}).exit_code == 0
    assert run("list").exit_code == 0
    assert [r.headers.get("authorization") for r in requests] == [
        f"Bearer {API_TOKEN}", f"Bearer {OPERATOR_TOKEN}", f"Bearer {OPERATOR_TOKEN}", None]


@pytest.mark.parametrize(("args", "env", "message"), [
    (("list",), {}, "wants a token: set SHOP_API_TOKEN"),
    (("list",), {"SHOP_API_TOKEN": "wrong-token-0123456789"},
     "refused the token in SHOP_API_TOKEN"),
    (("retire", "old"), {"SHOP_API_TOKEN": API_TOKEN}, "wants a token: set SHOP_OPERATOR_TOKEN"),
])
def test_a_401_says_which_variable_to_set(sent: Callable[[Handler], list[httpx.Request]],
                                          args: tuple[str, ...], env: dict[str, str],
                                          message: str) -> None:
    """The API wants a token: the error names the variable that holds it; exit 1."""
    sent(lambda _r: httpx.Response(401, json={"detail": "this API needs a token"},
                                   headers={"WWW-Authenticate": "Bearer"}))
    result = run(*args, env=env)
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stdout == ""


def test_a_403_gives_the_service_s_reason(sent: Callable[[Handler], list[httpx.Request]]) -> None:
    """Operator actions turned off: the service's answer says how to turn them on."""
    reason = "operator actions are off: start the order service with SHOP_OPERATOR_TOKEN set"
    sent(lambda _r: httpx.Response(403, json={"detail": reason}))
    result = run("retire", "old", env={"SHOP_OPERATOR_TOKEN": OPERATOR_TOKEN})
    assert result.exit_code == 1
    assert reason in " ".join(result.stderr.split())


def summaries(start: int, count: int) -> list[dict[str, Any]]:
    return [{"order_id": str(uuid.UUID(int=n)), "customer_id": "c", "currency": "EUR",
             "total": "1.00", "placed_at": "2025-01-01T12:00:00Z", "state": "placed",
             "handled": 1, "failed": 0, "pending": 0} for n in range(start, start + count)]


def paged(total: int) -> Handler:
    """An API of `total` orders, whose cursor is the index of the next one."""
    def handle(request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params["limit"])
        assert limit <= order_commands.PAGE
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


async def test_doctor_sends_the_token_and_says_what_to_set_on_401() -> None:
    """shop doctor's reads of the order API carry the token it is given; a 401 names
    SHOP_API_TOKEN."""
    seen: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json=[])

    async with httpx.AsyncClient(base_url="http://api", transport=httpx.MockTransport(handle)
                                 ) as client:
        found = await read_api("http://api", client, {"Authorization": f"Bearer {API_TOKEN}"})
    assert found.error is None
    assert seen == [f"Bearer {API_TOKEN}"] * 2

    refused = httpx.MockTransport(lambda _r: httpx.Response(401, json={"detail": "token"}))
    async with httpx.AsyncClient(base_url="http://api", transport=refused) as client:
        found = await read_api("http://api", client)
    assert found.error is not None
    assert "401" in found.error
    assert "SHOP_API_TOKEN" in found.error
