"""The live page (`GET /`) in headless Chromium: orders turn from pending to handled as it watches.

Driven by Playwright with Debian's chromium (`/usr/bin/chromium`, or `CHROMIUM`): Playwright's
own browser download is never used. Without a chromium the tests are skipped with the reason,
except under CI (`CI` set), where they fail. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.e2e.support import SUBSCRIBERS, System, run_system

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route, ViewportSize

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
PAGE_FILE = ROOT / "order_service" / "web" / "index.html"
# What this machine's closed network needs: no sandbox as root, no calls home at start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT: ViewportSize = {"width": 1200, "height": 800}
WAIT_MS = 30_000  # the longest any expectation below waits for the page

ORDER = {
    "customer_id": "cust-web",
    "currency": "EUR",
    "lines": [{"sku": "SKU-BOOK-1", "quantity": 1, "unit_price": "12.50",
               "seller_id": "seller-books"}],
    "total": "12.50",
    "shipping_address": {"name": "Grace Hopper", "street": "1 Compiler Way", "city": "Paris",
                         "postal_code": "75001", "country": "FR"},
}


def chromium() -> str:
    """The chromium binary, or skip (fail under CI) saying what is missing."""
    binary = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the Python package playwright is not installed (pip install -e '.[dev]')")
    if not (Path(binary).is_file() or shutil.which(binary)):
        problems.append(f"no chromium at {binary} (Debian: apt-get install chromium; or set "
                        "CHROMIUM to a Chromium binary)")
    if problems:
        message = "the browser tests cannot run: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message + ". CI fails here instead.")
    return binary


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    """A fresh headless Chromium page (new profile), closed afterwards; uncaught page errors
    fail the test."""
    binary = chromium()
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=binary, headless=True,
            args=CHROMIUM_ARGS, viewport=VIEWPORT)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page
        finally:
            context.close()
    assert not errors, f"the page threw: {errors}"


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, amqp_url: str,
           management_url: str) -> Iterator[System]:
    """The whole system under `shop up`, only when a browser can watch it."""
    chromium()
    with run_system(tmp_path_factory.mktemp("web"), amqp_url, management_url,
                    name="web") as system:
        yield system


def test_an_order_placed_while_watching_turns_from_pending_to_handled(
        system: System, page: Page) -> None:
    """The page shows a new order with logistics pending while it is paused, then every
    subscriber handled once it runs again; the queues panel lists the subscribers' queues,
    and a click on the order shows its trace across the services.

    Logistics is paused (SIGSTOP) so that "pending" lasts long enough to be seen: unpaused,
    the three subscribers answer faster than the page polls.
    """
    from playwright.sync_api import expect

    page.goto(f"{system.api}/")
    expect(page.locator("#updated")).to_contain_text("live", timeout=WAIT_MS)

    logistics = system.service_pid("logistics")
    os.kill(logistics, signal.SIGSTOP)
    try:
        response = httpx.post(f"{system.api}/orders", json=ORDER, timeout=10)
        assert response.status_code == 202, response.text
        order_id = response.json()["order_id"]
        row = page.locator(f'#orders tr[data-order-id="{order_id}"]')
        expect(row.locator('[data-subscriber="logistics"]')).to_have_attribute(
            "data-status", "pending", timeout=WAIT_MS)
        for name in ("inventory", "seller"):
            expect(row.locator(f'[data-subscriber="{name}"]')).to_have_attribute(
                "data-status", "handled", timeout=WAIT_MS)
        expect(row).to_have_attribute("data-status", "waiting")
        screenshot(page, "web-page-pending.png")
    finally:
        os.kill(logistics, signal.SIGCONT)

    for name in sorted(SUBSCRIBERS):
        light = row.locator(f'[data-subscriber="{name}"]')
        expect(light).to_have_attribute("data-status", "handled", timeout=WAIT_MS)
        expect(light).to_have_attribute("title", f"{name}: handled")
    expect(row).to_have_attribute("data-status", "all-handled")
    expect(row.locator(".state")).to_have_text("confirmed", timeout=WAIT_MS)

    prefix = system.env["SHOP_NAME_PREFIX"]
    for name in sorted(SUBSCRIBERS):
        queue = page.locator(f'#queues tr[data-queue="{prefix}{name}.order.placed"]')
        expect(queue).to_be_visible(timeout=WAIT_MS)
        expect(queue).not_to_have_class("no-consumer")
    expect(page.locator("#banner")).to_be_hidden()

    row.click()  # the order's trace: placed, then each subscriber's receipt
    trace = page.locator("#trace-body")
    expect(trace).to_contain_text("placed", timeout=WAIT_MS)
    for name in sorted(SUBSCRIBERS):
        expect(trace).to_contain_text(name, timeout=WAIT_MS)
    screenshot(page, "web-page.png")


# --- the page against canned answers: states a running system rarely shows on cue ---------

def summary(order_id: str, **fields: Any) -> dict[str, Any]:
    return {"order_id": order_id, "customer_id": "cust-1", "currency": "EUR", "total": "9.90",
            "placed_at": "2026-01-01T12:00:00Z", "state": "placed", "handled": 1, "failed": 1,
            "pending": 1, **fields}


def serve_canned(page: Page, orders: list[dict[str, Any]], system: dict[str, Any] | None,
                 details: dict[str, Any]) -> None:
    """Answer the page's requests from canned JSON (no service runs): `system=None` is a 404."""

    def handle(route: Route) -> None:
        path = route.request.url.split("//", 1)[1].split("/", 1)[1].split("?")[0]
        if path == "":
            route.fulfill(status=200, content_type="text/html", body=PAGE_FILE.read_text())
        elif path == "orders":
            route.fulfill(status=200, content_type="application/json", body=json.dumps(orders))
        elif path == "system" and system is not None:
            route.fulfill(status=200, content_type="application/json", body=json.dumps(system))
        elif path.removeprefix("orders/") in details:
            body = json.dumps(details[path.removeprefix("orders/")])
            route.fulfill(status=200, content_type="application/json", body=body)
        else:
            route.fulfill(status=404, content_type="application/json",
                          body='{"detail": "Not Found"}')

    page.route("http://shop.test/**", handle)


def test_failed_late_and_missing_consumers_are_shown(page: Page) -> None:
    """A failed subscriber is red with its reason on hover (read from the order's status),
    a late one magenta, a retrying one amber; a queue without consumers is highlighted, and
    the dead letters, late orders and problems of GET /system are shown."""
    from playwright.sync_api import expect

    order_id = "7c0d5a1e-0000-4000-8000-000000000001"
    subscribers = [{"name": "inventory", "status": "handled"},
                   {"name": "logistics", "status": "failed"},
                   {"name": "loyalty", "status": "retrying"},
                   {"name": "seller", "status": "late"}]
    detail = {"subscribers": [{"name": "logistics", "status": "failed",
                               "error": "ValueError: no carrier for XX"}]}
    problems = ["seller has not handled 1 order within 30 s",
                "queue p.seller.order.placed has no consumer"]
    system = {
        "healthy": False, "checked_at": "2026-01-01T12:00:05Z",
        "problems": problems,
        "broker": {"reachable": True, "source": "management API", "error": None},
        "subscribers": [{"name": "seller", "consumes": {"OrderPlaced": "p.seller.order.placed"},
                         "last_seen": "2026-01-01T11:59:00Z", "stale": False,
                         "queues": [{"queue": "p.seller.order.placed", "exists": True,
                                     "consumers": 0, "ready": 4, "unacked": 0,
                                     "dead_letters": 0}]}],
        "unannounced_queues": [],
        "queues": [{"queue": "p.seller.order.placed", "ready": 4, "unacked": 0, "consumers": 0,
                    "dead_letters": 0, "publish_rate": 0.5, "deliver_rate": 0.0},
                   {"queue": "p.logistics.order.placed", "ready": 0, "unacked": 0,
                    "consumers": 1, "dead_letters": 1, "publish_rate": None,
                    "deliver_rate": None}],
        "late_orders": 1, "dead_letters": 1,
    }
    serve_canned(page, [summary(order_id, subscribers=subscribers)], system,
                 {order_id: detail})
    page.goto("http://shop.test/")

    row = page.locator(f'#orders tr[data-order-id="{order_id}"]')
    expect(row.locator('[data-subscriber="logistics"]')).to_have_attribute(
        "title", "logistics: failed — ValueError: no carrier for XX", timeout=WAIT_MS)
    expect(row).to_have_attribute("data-status", "failed")
    colours = {name: row.locator(f'[data-subscriber="{name}"]').evaluate(
        "e => getComputedStyle(e, '::before').backgroundColor")
        for name in ("inventory", "logistics", "loyalty", "seller")}
    assert colours == {"inventory": "rgb(31, 157, 85)", "logistics": "rgb(214, 58, 58)",
                       "loyalty": "rgb(230, 161, 0)", "seller": "rgb(192, 38, 211)"}

    expect(page.locator('#queues tr[data-queue="p.seller.order.placed"]')).to_have_class(
        "no-consumer")
    expect(page.locator('#queues tr[data-queue="p.logistics.order.placed"]')).not_to_have_class(
        "no-consumer")
    expect(page.locator("#dead-letters")).to_have_text("1")
    expect(page.locator("#late-orders")).to_have_text("1")
    expect(page.locator("#problems li")).to_have_text(problems)
    expect(page.locator("#health")).to_have_text("2 problems")
    screenshot(page, "web-page-canned.png")


def test_an_older_order_service_gets_counts_and_no_system_view(page: Page) -> None:
    """Without per-subscriber statuses in the summaries the page shows the counts, and a 404
    from GET /system reads "not available" rather than an error."""
    from playwright.sync_api import expect

    order_id = "7c0d5a1e-0000-4000-8000-000000000002"
    serve_canned(page, [summary(order_id, handled=3, failed=0, pending=0)], None, {})
    page.goto("http://shop.test/")

    row = page.locator(f'#orders tr[data-order-id="{order_id}"]')
    expect(row.locator(".counts")).to_have_text("3 handled0 failed0 pending", timeout=WAIT_MS)
    expect(row).to_have_attribute("data-status", "all-handled")
    expect(page.locator("#system-unavailable")).to_contain_text("Not available")
    expect(page.locator("#health")).to_have_text("system: not available")
    expect(page.locator("#banner")).to_be_hidden()


def test_the_page_asks_for_the_token_once_and_keeps_it_for_the_tab(page: Page) -> None:
    """A service with SHOP_API_TOKEN answers 401: the page shows one token form (both polls
    wait on it), says when a token was refused, then sends the token as a bearer header on
    every request, never in a URL; it is kept for the tab (sessionStorage), so a reload does
    not ask again."""
    from playwright.sync_api import expect

    token = "page-token-0123456789abcdef"
    order_id = "7c0d5a1e-0000-4000-8000-000000000003"
    seen: list[tuple[str, str | None, int]] = []

    def handle(route: Route) -> None:
        request = route.request
        path = request.url.split("//", 1)[1].split("/", 1)[1].split("?")[0]
        sent = request.headers.get("authorization")
        if path == "":
            status, body = 200, PAGE_FILE.read_text()
        elif sent != f"Bearer {token}":
            status, body = 401, '{"detail": "this API needs a token"}'
        elif path == "orders":
            status, body = 200, json.dumps([summary(order_id, handled=3, failed=0, pending=0)])
        else:
            status, body = 404, '{"detail": "Not Found"}'
        seen.append((request.url, sent, status))
        route.fulfill(status=status, body=body, headers={"WWW-Authenticate": "Bearer"},
                      content_type="text/html" if path == "" else "application/json")

    page.route("http://shop.test/**", handle)
    page.goto("http://shop.test/")
    form = page.locator("#token")
    expect(form).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#token-note")).to_have_text("")
    page.fill("#token-input", "not-the-token-0123456789")
    page.press("#token-input", "Enter")
    expect(page.locator("#token-note")).to_have_text("The token was refused: check it.",
                                                     timeout=WAIT_MS)
    screenshot(page, "web-page-token.png")
    page.fill("#token-input", token)
    page.click("#token button")

    row = page.locator(f'#orders tr[data-order-id="{order_id}"]')
    expect(row).to_be_visible(timeout=WAIT_MS)
    expect(form).to_be_hidden()
    expect(page.locator("#banner")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('shop-api-token')") == token
    # Two polls refused without a token, two with the wrong one; none while the form waited.
    assert [status for _url, _sent, status in seen].count(401) == 4

    page.reload()
    expect(row).to_be_visible(timeout=WAIT_MS)
    expect(form).to_be_hidden()
    assert [status for _url, _sent, status in seen].count(401) == 4
    assert all(token not in url for url, _sent, _status in seen)
    assert token not in page.url
