"""Text from the broker, the services' stores or a user is printed as it is by every
renderer of the `shop` CLI, never read as Rich markup (`[/x]` crashed it, `[bold]` vanished)."""

from __future__ import annotations

import asyncio
import io
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import aio_pika
import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from common.ops import cli, dlq, observe, queues_cli
from common.ops.dead_letter import DeadLetter, describe
from common.ops.doctor import Check, Diagnosis, print_checklist
from inventory_service import cli as inventory_cli
from inventory_service.store import StockLevel
from logistics_service import cli as logistics_cli
from logistics_service.domain import Shipment
from seller_service import cli as seller_cli
from seller_service.store import Notification

pytestmark = pytest.mark.unit

#: A closing tag Rich cannot match (MarkupError), a style tag it would swallow, an emoji
#: code it would replace.
MARKUP = ":warning: [bold]as typed[/bold] [/x]"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
EVENT_ID = str(uuid.uuid4())


def shop(*args: str) -> Result:
    return CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "400"})


def squeezed(text: str) -> str:
    return " ".join(text.split())


def reading_markup() -> Console:
    """A console as Rich makes it by default: it reads markup in the strings it prints."""
    return Console(record=True, width=400, file=io.StringIO())


def dead_letter(queue: str) -> DeadLetter:
    message = aio_pika.Message(
        body=f"not json {MARKUP}".encode(), message_id=EVENT_ID, type=f"type {MARKUP}",
        correlation_id=f"flow {MARKUP}",
        headers={"x-error-reason": f"reason {MARKUP}", "x-exception-type": "ValueError",
                 "x-exception-message": f"message {MARKUP}", "x-attempts": 3,
                 "x-original-queue": f"queue {MARKUP}", f"x-header {MARKUP}": f"value {MARKUP}",
                 "x-failed-at": NOW.isoformat()})
    return describe(queue, message)


@pytest.fixture
def letters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two dead letters in two queues (so the queue column shows), found by any id."""
    found = [dead_letter(f"dlq-1 {MARKUP}"), dead_letter(f"dlq-2 {MARKUP}")]

    async def list_dead_letters(*_args: Any, **_kwargs: Any) -> dlq.Listing:
        return dlq.Listing(found, {letter.dlq: 1 for letter in found})

    async def find_dead_letters(*_args: Any) -> list[DeadLetter]:
        return found[:1]

    monkeypatch.setattr(dlq, "list_dead_letters", list_dead_letters)
    monkeypatch.setattr(dlq, "find_dead_letters", find_dead_letters)


@pytest.mark.usefixtures("letters")
def test_dlq_list_prints_queues_reasons_and_exceptions_as_they_are() -> None:
    """The dead-letter table: queue, event type, reason and exception verbatim."""
    result = shop("dlq", "list", "inventory")
    assert result.exit_code == 0, result.output
    shown = squeezed(result.stdout)
    for field in ("dlq-1", "type", "reason", "ValueError: message"):
        assert f"{field} {MARKUP}" in shown, shown


@pytest.mark.usefixtures("letters")
def test_dlq_show_prints_facts_headers_and_a_text_body_as_they_are() -> None:
    """One dead letter: its facts, every header (name and value) and its body verbatim."""
    result = shop("dlq", "show", EVENT_ID)
    assert result.exit_code == 0, result.output
    shown = squeezed(result.stdout)
    for field in ("dlq-1", "queue", "flow", "x-header", "value", "not json"):
        assert f"{field} {MARKUP}" in shown, shown


def test_the_doctor_checklist_prints_names_details_and_items_as_they_are() -> None:
    """Each check's detail and items quote the broker and the API: verbatim, even on a
    console that reads markup."""
    diagnosis = Diagnosis(checked_at=NOW, checks=[
        Check(f"check {MARKUP}", "failed", f"detail {MARKUP}", (f"item {MARKUP}",))])
    console = reading_markup()
    print_checklist(diagnosis, console)
    shown = squeezed(console.export_text())
    assert "1 check(s) failed" in shown
    for field in ("✗ check", "detail", "item"):
        assert f"{field} {MARKUP}" in shown, shown


def test_the_queue_table_prints_queue_names_as_they_are() -> None:
    """A queue's name is anybody's: verbatim in the table, even on a console that reads
    markup (the live view and the saved picture print the same table)."""
    row = observe.QueueRow(queue=f"queue {MARKUP}", exists=True, ready=1, unacked=0,
                           consumers=1, dead_letters=0, publish_rate=None, deliver_rate=None)
    console = reading_markup()
    console.print(queues_cli.queue_table([row], title="queues"))
    assert f"queue {MARKUP}" in squeezed(console.export_text())


def test_queues_prints_the_brokers_error_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """`shop queues` with the broker unreachable: its error on stderr, verbatim."""

    async def unreachable(_settings: Any) -> tuple[observe.BrokerSnapshot, list[Any]]:
        return observe.BrokerSnapshot(
            source=observe.AMQP, reachable=False, error=f"error {MARKUP}", queues={},
            bindings=None, listed_all=False, taken_at=NOW), []

    monkeypatch.setattr(queues_cli, "read", unreachable)
    result = shop("queues")
    assert result.exit_code == 1
    assert f"error: error {MARKUP}" in squeezed(result.stderr)


def test_shop_up_prints_why_the_broker_did_not_answer_as_it_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`shop up` without a broker: the reason (it quotes the URL and the client's error) on
    stderr, verbatim."""

    async def no_broker(_url: str, _wait: float) -> None:
        raise ConnectionError(f"refused {MARKUP}")

    monkeypatch.setattr(cli, "_check_broker", no_broker)
    result = shop("up", "--broker-wait", "0")
    assert result.exit_code == 1
    assert f"error: refused {MARKUP}" in squeezed(result.stderr)


class Store:
    """A service's store whose reads answer what the test put in it."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers

    def __getattr__(self, name: str) -> Any:
        async def read(*_args: Any) -> Any:
            return self.answers[name]
        return read


def test_the_services_tables_print_what_their_stores_hold_as_it_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stock, shipments and a seller's inbox: what the stores hold, verbatim."""
    order = uuid.uuid4()
    shipment = Shipment(shipment_id=uuid.uuid4(), order_id=order, carrier=f"carrier {MARKUP}",
                        tracking_number=f"tracking {MARKUP}", destination_country="DE",
                        estimated_delivery=date(2025, 3, 3))
    stores = {
        inventory_cli: Store(list_stock=[StockLevel(sku=f"sku {MARKUP}", on_hand=1,
                                                    reserved=0, updated_at=NOW)]),
        logistics_cli: Store(list_shipments=[shipment], get=shipment),
        seller_cli: Store(inbox=[Notification(
            seller_id="seller-books", order_id=order, lines=(), total=Decimal("1.00"),
            currency=f"currency {MARKUP}", created_at=NOW)]),
    }
    for module, store in stores.items():
        monkeypatch.setattr(module, "_run",
                            lambda work, store=store: asyncio.run(work(store)))
    for args, field in ((("inventory", "stock", "list"), "sku"),
                        (("logistics", "shipments", "list"), "carrier"),
                        (("logistics", "shipments", "show", str(order)), "tracking"),
                        (("seller", "inbox", "seller-books"), "1.00 currency")):
        result = shop(*args)
        assert result.exit_code == 0, result.output
        assert f"{field} {MARKUP}" in squeezed(result.stdout), result.stdout
