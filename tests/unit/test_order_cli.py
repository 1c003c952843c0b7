"""`shop order ...`: input checked before sending, answers printed readably (fake HTTP)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from order_service import cli
from order_service.cli import client, placing
from order_service.cli import orders as order_commands

pytestmark = pytest.mark.unit

ADDRESS = ["--name", "Ada", "--street", "1 Row", "--city", "Berlin", "--postal-code", "10115",
           "--country", "DE"]
ORDER_ID = str(uuid.uuid4())


class FakeApi:
    """Answers the CLI's requests from a handler and remembers every request."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response]) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.base_urls: list[str] = []

    def client(self, base_url: str) -> httpx.Client:
        self.base_urls.append(base_url)
        return httpx.Client(base_url=base_url, transport=httpx.MockTransport(self._handle))

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)


def accepted(request: httpx.Request) -> httpx.Response:
    return httpx.Response(202, json={"order_id": ORDER_ID, "status_url": f"/orders/{ORDER_ID}",
                                     "state": "accepted", "order": json.loads(request.content)})


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeApi]:
    def install(handler: Callable[[httpx.Request], httpx.Response] = accepted) -> FakeApi:
        fake = FakeApi(handler)
        monkeypatch.setattr(client, "make_client", fake.client)
        return fake
    monkeypatch.delenv("SHOP_API_URL", raising=False)
    return install


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli.app, list(args), input=stdin)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_place_sends_the_order_and_prints_its_id(api: Callable[..., FakeApi]) -> None:
    """Options become one order; the id is the only output."""
    fake = api()
    result = run("place", "--customer", "cust-1", "--item", "SKU-1:2:19.99:books",
                 "--item", "SKU-2:1:5:mugs", *ADDRESS)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == ORDER_ID
    [request] = fake.requests
    assert request.method == "POST"
    assert request.url.path == "/orders"
    sent = json.loads(request.content)
    assert sent["lines"] == [
        {"sku": "SKU-1", "quantity": 2, "unit_price": "19.99", "seller_id": "books"},
        {"sku": "SKU-2", "quantity": 1, "unit_price": "5", "seller_id": "mugs"}]
    assert sent["currency"] == "EUR"
    assert sent["shipping_address"]["postal_code"] == "10115"


def test_place_retries_a_lost_answer_with_the_same_idempotency_key(
        api: Callable[..., FakeApi]) -> None:
    """The connection drops before the answer: sent again with the same key (the API then
    places it once); the order's id is printed. `--idempotency-key` sets the key."""
    calls: list[httpx.Request] = []

    def drop_first(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ReadError("connection reset", request=request)
        return accepted(request)

    fake = api(drop_first)
    result = run("place", "--customer", "c", "--item", "S:1:1:x", *ADDRESS)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == ORDER_ID
    first, second = fake.requests
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert uuid.UUID(first.headers["idempotency-key"])
    result = run("place", "--customer", "c", "--item", "S:1:1:x", *ADDRESS,
                 "--idempotency-key", "my-key")
    assert fake.requests[-1].headers["idempotency-key"] == "my-key"


def test_place_gives_up_after_its_attempts(api: Callable[..., FakeApi]) -> None:
    def reset(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset", request=request)

    fake = api(reset)
    result = run("place", "--customer", "c", "--item", "S:1:1:x", *ADDRESS)
    assert result.exit_code == 1
    assert "connection reset" in result.stderr
    assert len(fake.requests) == placing.PLACE_ATTEMPTS


def test_place_json_prints_the_whole_answer(api: Callable[..., FakeApi]) -> None:
    """--json prints the API's answer, the order included."""
    api()
    result = run("place", "--customer", "c", "--item", "S:1:1.00:x", *ADDRESS, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["order_id"] == ORDER_ID
    assert answer["order"]["customer_id"] == "c"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("SKU-1:2:19.99", "expected SKU:QTY:PRICE:SELLER"),
        ("SKU-1:2:19.99:books:extra", "expected SKU:QTY:PRICE:SELLER"),
        ("SKU-1:0:19.99:books", "quantity must be at least 1, got 0"),
        ("SKU-1:-2:19.99:books", "quantity must be at least 1, got -2"),
        ("SKU-1:two:19.99:books", "quantity 'two' is not a whole number"),
        ("SKU-1:2:cheap:books", "price 'cheap' is not a number"),
        ("SKU-1:2:-1:books", "price must be a number, zero or more"),
        ("SKU-1:2:1.999:books", "more than 2 decimal places"),
        (":2:1:books", "the SKU is empty"),
        ("SKU-1:2:1:", "the seller is empty"),
    ],
)
def test_a_bad_item_is_refused_before_anything_is_sent(api: Callable[..., FakeApi], item: str,
                                                      message: str) -> None:
    """Exit 2 with a message naming the item and what is wrong; no request at all."""
    fake = api()
    result = run("place", "--customer", "c", "--item", item, *ADDRESS)
    assert result.exit_code == 2
    assert message in flat(result.stderr)
    assert item in result.stderr
    assert fake.requests == []


def test_missing_options_are_named(api: Callable[..., FakeApi]) -> None:
    """Without --item and the address, the missing options are listed; nothing is sent."""
    fake = api()
    result = run("place", "--customer", "c")
    assert result.exit_code == 2
    for flag in ("--item", "--name", "--street", "--city", "--postal-code", "--country"):
        assert flag in result.stderr
    assert fake.requests == []


def test_an_order_the_api_would_refuse_is_refused_locally(api: Callable[..., FakeApi]) -> None:
    """The whole order is validated before sending: a bad country is named, nothing sent."""
    fake = api()
    result = run("place", "--customer", "c", "--item", "S:1:1:x", *ADDRESS[:-1], "Germany",
                 "--currency", "XYZ")
    assert result.exit_code == 2
    assert "shipping_address.country:" in result.stderr
    assert "currency:" in result.stderr
    assert fake.requests == []


def test_place_from_a_file(api: Callable[..., FakeApi], tmp_path: Path) -> None:
    """--file sends the order in the file as it is."""
    fake = api()
    order = {"customer_id": "c", "lines": [{"sku": "S", "quantity": 1, "unit_price": "2.50",
                                            "seller_id": "x"}],
             "shipping_address": {"name": "A", "street": "B", "city": "C", "postal_code": "1",
                                  "country": "FR"}}
    path = tmp_path / "order.json"
    path.write_text(json.dumps(order))
    result = run("place", "--file", str(path))
    assert result.exit_code == 0, result.output
    assert json.loads(fake.requests[0].content) == order


def test_place_from_standard_input(api: Callable[..., FakeApi]) -> None:
    """--file - reads the order from standard input."""
    fake = api()
    order = {"customer_id": "c", "lines": [{"sku": "S", "quantity": 1, "unit_price": "1",
                                            "seller_id": "x"}],
             "shipping_address": {"name": "A", "street": "B", "city": "C", "postal_code": "1",
                                  "country": "FR"}}
    result = run("place", "--file", "-", stdin=json.dumps(order))
    assert result.exit_code == 0, result.output
    assert json.loads(fake.requests[0].content)["customer_id"] == "c"


@pytest.mark.parametrize(
    ("stdin", "message"),
    [("{oops", "standard input is not valid JSON"),
     ("[1, 2]", "must hold one JSON object"),
     ('{"customer_id": "c"}', "lines: Field required")],
)
def test_a_bad_order_file_is_refused(api: Callable[..., FakeApi], stdin: str,
                                     message: str) -> None:
    """Broken or incomplete JSON is refused with a message; nothing is sent."""
    fake = api()
    result = run("place", "--file", "-", stdin=stdin)
    assert result.exit_code == 2
    assert message in result.stderr
    assert fake.requests == []


def test_a_missing_order_file_is_refused(api: Callable[..., FakeApi], tmp_path: Path) -> None:
    """A file that cannot be read: exit 2 naming it."""
    api()
    result = run("place", "--file", str(tmp_path / "nope.json"))
    assert result.exit_code == 2
    assert "cannot read" in result.stderr


def test_file_and_options_do_not_mix(api: Callable[..., FakeApi]) -> None:
    """--file holds the whole order: other order options are refused alongside it."""
    fake = api()
    result = run("place", "--file", "-", "--customer", "c", stdin="{}")
    assert result.exit_code == 2
    assert "drop --customer" in result.stderr
    assert fake.requests == []


def test_api_validation_errors_are_printed_per_field(api: Callable[..., FakeApi]) -> None:
    """A 422 from the API lists `field: message` lines and exits 2."""
    api(lambda _r: httpx.Response(422, json={"detail": [
        {"type": "greater_than_equal", "loc": ["body", "lines", 0, "quantity"],
         "msg": "Input should be greater than or equal to 1"},
        {"type": "value_error", "loc": ["body", "total"],
         "msg": "Value error, total 1 does not equal the sum of the lines 2"}]}))
    result = run("place", "--customer", "c", "--item", "S:1:1:x", *ADDRESS)
    assert result.exit_code == 2
    assert "lines.0.quantity: Input should be greater than or equal to 1" in result.stderr
    assert "total: total 1 does not equal the sum of the lines 2" in result.stderr


def test_a_service_that_does_not_answer_is_explained(api: Callable[..., FakeApi]) -> None:
    """Connection refused: says where it tried and how to start the services."""
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    api(refuse)
    result = run("list", "--api", "http://127.0.0.1:1")
    assert result.exit_code == 1
    assert "http://127.0.0.1:1" in result.stderr
    assert "is the order service running? (shop up)" in flat(result.stderr)


def test_the_api_url_comes_from_the_environment(api: Callable[..., FakeApi],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """SHOP_API_URL replaces the default base URL."""
    fake = api(lambda _r: httpx.Response(200, json=[]))
    monkeypatch.setenv("SHOP_API_URL", "http://orders.example:9000")
    assert run("list", "--json").exit_code == 0
    assert fake.base_urls == ["http://orders.example:9000"]


def status_body(*, complete: bool) -> dict[str, Any]:
    return {
        "order": {"order_id": ORDER_ID, "customer_id": "cust-1", "lines": [], "currency": "EUR",
                  "total": "39.98", "shipping_address": {}, "placed_at": "2025-01-01T12:00:00Z"},
        "state": "confirmed" if complete else "placed",
        "complete": complete,
        "subscribers": [
            {"name": "inventory", "expected": True, "status": "handled", "outcome": "handled",
             "error": None, "at": "2025-01-01T12:00:01Z", "duration_ms": 4.2},
            {"name": "logistics", "expected": True, "status": "failed",
             "outcome": "dead_lettered", "error": "KeyError: 'ZZ'", "at": "2025-01-01T12:00:01Z",
             "duration_ms": 1.0},
            {"name": "seller", "expected": True,
             "status": "handled" if complete else "pending", "outcome": None, "error": None,
             "at": None, "duration_ms": None},
        ],
        "outcomes": [{"kind": "stock_reserved", "at": "2025-01-01T12:00:01Z",
                      "detail": {"lines": [{"sku": "S", "quantity": 2}]}}],
    }


def test_status_shows_subscribers_and_outcomes(api: Callable[..., FakeApi]) -> None:
    """The table lists each subscriber's outcome and error, then the outcomes."""
    fake = api(lambda _r: httpx.Response(200, json=status_body(complete=True)))
    result = run("status", ORDER_ID)
    assert result.exit_code == 0, result.output
    assert fake.requests[0].url.path == f"/orders/{ORDER_ID}"
    for text in ("inventory", "handled", "logistics", "failed", "KeyError: 'ZZ'", "4.2 ms",
                 "confirmed", "reserved 1 line(s)"):
        assert text in result.stdout


def test_status_json(api: Callable[..., FakeApi]) -> None:
    """--json prints the API's status as it is."""
    api(lambda _r: httpx.Response(200, json=status_body(complete=True)))
    result = run("status", ORDER_ID, "--json")
    assert json.loads(result.stdout) == status_body(complete=True)


def test_status_wait_polls_until_nobody_is_pending(api: Callable[..., FakeApi],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """--wait asks again until the fan-out is complete, then exits 0."""
    answers = [status_body(complete=False), status_body(complete=False),
               status_body(complete=True)]
    fake = api(lambda _r: httpx.Response(200, json=answers.pop(0)))
    naps: list[float] = []
    monkeypatch.setattr(order_commands, "_sleep", naps.append)
    result = run("status", ORDER_ID, "--wait", "30", "--json")
    assert result.exit_code == 0, result.output
    assert len(fake.requests) == 3
    assert len(naps) == 2
    assert json.loads(result.stdout)["complete"] is True


def test_status_wait_gives_up_at_the_deadline(api: Callable[..., FakeApi]) -> None:
    """Still pending when the wait is over: exit 1 naming who has not answered."""
    api(lambda _r: httpx.Response(200, json=status_body(complete=False)))
    result = run("status", ORDER_ID, "--wait", "0")
    assert result.exit_code == 1
    assert "still waiting after 0s for: seller" in result.stderr


def test_status_of_a_malformed_id_is_refused_locally(api: Callable[..., FakeApi]) -> None:
    """An id that is not a UUID: exit 2, nothing sent."""
    fake = api()
    result = run("status", "1234")
    assert result.exit_code == 2
    assert "not an order id" in result.stderr
    assert fake.requests == []


def test_status_of_an_unknown_order(api: Callable[..., FakeApi]) -> None:
    """The API's 404 message is shown and the exit code is 1."""
    api(lambda _r: httpx.Response(404, json={"detail": f"order {ORDER_ID} not found"}))
    result = run("status", ORDER_ID)
    assert result.exit_code == 1
    assert f"order {ORDER_ID} not found" in result.stderr


def test_list_asks_for_the_limit_and_shows_the_orders(api: Callable[..., FakeApi]) -> None:
    """list passes --limit and prints one row per order."""
    summary = {"order_id": ORDER_ID, "customer_id": "cust-1", "currency": "EUR",
               "total": "1.00", "placed_at": "2025-01-01T12:00:00Z", "state": "placed",
               "handled": 2, "failed": 0, "pending": 1}
    fake = api(lambda _r: httpx.Response(200, json=[summary]))
    result = run("list", "--limit", "5")
    assert result.exit_code == 0, result.output
    assert fake.requests[0].url.params["limit"] == "5"
    assert ORDER_ID in result.stdout
    assert "2/3" in result.stdout
    assert json.loads(run("list", "--json").stdout) == [summary]


def test_subscribers_lists_the_registry(api: Callable[..., FakeApi]) -> None:
    """subscribers shows each registered service and what it consumes."""
    entry = {"name": "inventory", "consumes": {"OrderPlaced": "inventory.order.placed"},
             "instance": "h:1", "first_seen": "2025-01-01T12:00:00Z",
             "last_seen": "2025-01-01T12:01:00Z"}
    api(lambda _r: httpx.Response(200, json=[entry]))
    result = run("subscribers")
    assert result.exit_code == 0, result.output
    assert "OrderPlaced" in result.stdout
    assert json.loads(run("subscribers", "--json").stdout) == [entry]


def test_retire_deletes_the_subscriber_and_names_its_queues(
        api: Callable[..., FakeApi]) -> None:
    """retire sends DELETE /subscribers/{name} (force only when asked) and says which
    queues are left to delete; the API's refusal is shown as it came."""
    entry = {"name": "loyalty", "consumes": {"OrderPlaced": "loyalty.order.placed"},
             "instance": "h:1", "first_seen": "2025-01-01T12:00:00Z",
             "last_seen": "2025-01-01T12:01:00Z"}
    fake = api(lambda _r: httpx.Response(200, json=entry))
    result = run("retire", "loyalty", "--force")
    assert result.exit_code == 0, result.output
    [request] = fake.requests
    assert (request.method, request.url.path) == ("DELETE", "/subscribers/loyalty")
    assert request.url.params["force"] == "true"
    assert "loyalty.order.placed" in result.stdout
    api(lambda _r: httpx.Response(409, json={"detail": "subscriber 'loyalty' announced "
                                                       "itself 3 s ago"}))
    refused = run("retire", "loyalty")
    assert refused.exit_code != 0
    assert "announced itself 3 s ago" in refused.output


def test_status_shows_a_late_subscriber_and_where_a_failed_one_waits(
        api: Callable[..., FakeApi]) -> None:
    """Late is its own status; a failure names its dead-letter queue; --wait counts a late
    subscriber as unanswered and names it with its status."""
    body = status_body(complete=False)
    body["subscribers"][1]["dead_letter_queue"] = "logistics.order.placed.dlq"
    body["subscribers"][2].update(status="late", late=True)
    api(lambda _r: httpx.Response(200, json=body))
    result = CliRunner().invoke(cli.app, ["status", ORDER_ID, "--wait", "0"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "│ seller     │ late " in result.stdout
    assert "waits in logistics.order.placed.dlq" in result.stdout
    assert "still waiting after 0s for: seller (late)" in result.stderr


def test_list_shows_late_orders(api: Callable[..., FakeApi]) -> None:
    """A summary with a late subscriber says how many, beside the handled count."""
    summary = {"order_id": ORDER_ID, "customer_id": "cust-1", "currency": "EUR",
               "total": "1.00", "placed_at": "2025-01-01T12:00:00Z", "state": "placed",
               "handled": 2, "failed": 0, "pending": 0, "retrying": 0, "late": 1,
               "subscribers": [{"name": "a", "status": "handled"},
                               {"name": "b", "status": "handled"},
                               {"name": "c", "status": "late"}]}
    api(lambda _r: httpx.Response(200, json=[summary]))
    result = run("list")
    assert result.exit_code == 0, result.output
    assert "2/3 (1 late)" in result.stdout


TRACE = {"order_id": ORDER_ID, "steps": [
    {"at": "2025-01-01T12:00:00Z", "since_placed_ms": 0.0, "service": "order",
     "kind": "placed", "what": "OrderPlaced stored with the order (outbox)", "outcome": None,
     "duration_ms": None},
    {"at": "2025-01-01T12:00:00.020Z", "since_placed_ms": 20.0, "service": "inventory",
     "kind": "receipt", "what": "OrderPlaced from inventory.order.placed",
     "outcome": "handled", "duration_ms": 3.25},
    {"at": "2025-01-01T12:00:00.030Z", "since_placed_ms": 30.0, "service": "inventory",
     "kind": "outcome", "what": "StockReserved: reserved 1 line(s)",
     "outcome": "stock_reserved", "duration_ms": None}]}


def test_trace_prints_the_timeline(api: Callable[..., FakeApi]) -> None:
    """One row per step: ms since placement, service, step, what, how long it took."""
    fake = api(lambda _r: httpx.Response(200, json=TRACE))
    result = run("trace", ORDER_ID)
    assert result.exit_code == 0, result.output
    assert fake.requests[0].url.path == f"/orders/{ORDER_ID}/trace"
    lines = [flat(line) for line in result.stdout.splitlines()]
    assert any(line.startswith("│ 20.0 │ inventory │ handled │ OrderPlaced from") and
               "3.2 ms" in line for line in lines), result.stdout
    assert any("StockReserved: reserved 1 line(s)" in line for line in lines)
    assert json.loads(run("trace", ORDER_ID, "--json").stdout) == TRACE


def test_trace_refuses_a_malformed_id_and_reports_an_unknown_one(
        api: Callable[..., FakeApi]) -> None:
    """Not a UUID: exit 2, nothing sent; unknown: the API's 404 message, exit 1."""
    fake = api(lambda _r: httpx.Response(404, json={"detail": f"order {ORDER_ID} not found"}))
    assert run("trace", "42").exit_code == 2
    assert fake.requests == []
    result = run("trace", ORDER_ID)
    assert result.exit_code == 1
    assert f"order {ORDER_ID} not found" in result.stderr


#: Text as the broker, the API or a user may hand it over: a closing tag Rich cannot match
#: (a MarkupError), a style tag it would swallow, an emoji code it would replace.
MARKUP = ":warning: [bold]as typed[/bold] [/x]"


def wide(*args: str) -> str:
    """A command's stdout on a terminal wide enough that no cell wraps, spaces squeezed."""
    result = CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "400"})
    assert result.exit_code in (0, 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        result.exception
    return flat(result.stdout)


def test_status_prints_the_apis_text_as_it_is(api: Callable[..., FakeApi]) -> None:
    """A subscriber's name, error and dead-letter queue, the customer and an outcome's
    reason are printed verbatim, never read as markup."""
    body = status_body(complete=True)
    body["order"]["customer_id"] = f"cust {MARKUP}"
    body["subscribers"][0]["name"] = f"name {MARKUP}"
    body["subscribers"][1].update(error=f"error {MARKUP}", dead_letter_queue=f"dlq {MARKUP}")
    body["outcomes"].append({"kind": "stock_failed", "at": "2025-01-01T12:00:01Z",
                             "detail": {"reason": f"reason {MARKUP}"}})
    api(lambda _r: httpx.Response(200, json=body))
    shown = wide("status", ORDER_ID)
    for field in ("cust", "name", "error", "waits in dlq", "reason"):
        assert f"{field} {MARKUP}" in shown, shown


def test_a_status_without_subscribers_says_so(api: Callable[..., FakeApi]) -> None:
    """No subscriber was registered: one line says so instead of an empty table."""
    body = status_body(complete=True)
    body["subscribers"] = []
    api(lambda _r: httpx.Response(200, json=body))
    shown = wide("status", ORDER_ID)
    assert "no subscriber of OrderPlaced was registered when this order was placed" in shown
    assert "[" not in shown


def test_trace_prints_the_apis_text_as_it_is(api: Callable[..., FakeApi]) -> None:
    """A step's service and what it says (a receipt's error) are printed verbatim: a `[/x]`
    in them crashed the trace with Rich's MarkupError."""
    trace = {"order_id": ORDER_ID, "steps": [
        {"at": "2025-01-01T12:00:00.020Z", "since_placed_ms": 20.0, "service": f"svc {MARKUP}",
         "kind": "receipt", "what": f"what {MARKUP}", "outcome": "dead_lettered",
         "duration_ms": 3.25}]}
    api(lambda _r: httpx.Response(200, json=trace))
    shown = wide("trace", ORDER_ID)
    assert f"svc {MARKUP}" in shown, shown
    assert f"what {MARKUP}" in shown


def test_list_subscribers_and_retire_print_the_apis_text_as_it_is(
        api: Callable[..., FakeApi]) -> None:
    """An order's state, a subscriber's name, events, instance and queues: verbatim."""
    summary = {"order_id": ORDER_ID, "customer_id": "cust-1", "currency": "EUR",
               "total": "1.00", "placed_at": "2025-01-01T12:00:00Z",
               "state": f"state {MARKUP}", "handled": 1, "failed": 0, "pending": 0}
    api(lambda _r: httpx.Response(200, json=[summary]))
    assert f"state {MARKUP}" in wide("list")
    entry = {"name": f"name {MARKUP}", "consumes": {f"event {MARKUP}": f"queue {MARKUP}"},
             "instance": f"instance {MARKUP}", "first_seen": "2025-01-01T12:00:00Z",
             "last_seen": "2025-01-01T12:01:00Z"}
    api(lambda _r: httpx.Response(200, json=[entry]))
    shown = wide("subscribers")
    for field in ("name", "event", "instance"):
        assert f"{field} {MARKUP}" in shown, shown
    api(lambda _r: httpx.Response(200, json=entry))
    shown = wide("retire", "loyalty")
    assert f"retired name {MARKUP}: orders placed" in shown, shown
    assert f"queue {MARKUP}" in shown
