"""Dead-letter tooling without a broker: reading a dead letter, its replay, `shop dlq` output."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from typer.testing import CliRunner, Result

from common.kit.settings import ServiceSettings
from common.ops import dead_letter, dlq, dlq_cli, dlq_replay

pytestmark = pytest.mark.unit

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
EVENT_ID = str(uuid.uuid4())
ORDER_ID = str(uuid.uuid4())
QUEUE = "p.inventory.order.placed"
DLQ = f"{QUEUE}.dlq"


def kit_dead_letter(**headers: Any) -> aio_pika.Message:
    """A message as the kit parks it after its last retry."""
    return aio_pika.Message(
        body=json.dumps({"event_id": EVENT_ID, "event_type": "OrderPlaced",
                         "order_id": ORDER_ID}).encode(),
        message_id=EVENT_ID, type="OrderPlaced", correlation_id=ORDER_ID,
        content_type="application/json", app_id="order",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={
            "schema_version": 1,
            "x-error-reason": "retries_exhausted",
            "x-exception-type": "RuntimeError",
            "x-exception-message": "the warehouse is down",
            "x-failed-at": (NOW - timedelta(minutes=5)).isoformat(),
            "x-first-failed-at": (NOW - timedelta(minutes=6)).isoformat(),
            "x-service": "inventory",
            "x-original-queue": QUEUE,
            "x-original-exchange": "p.order.placed",
            "x-attempts": 3,
            **headers,
        },
    )


def broker_dead_letter() -> aio_pika.Message:
    """A message the broker dead-lettered itself (delivery limit), after one kit retry.

    The kit's headers from the earlier failure are still on it; x-death says what happened.
    """
    message = kit_dead_letter()
    headers = dict(message.headers)
    del headers["x-original-queue"]
    headers.update({
        "x-error-reason": "handler_error",
        "x-attempts": 1,
        "x-death": [{"count": 1, "reason": "delivery_limit", "queue": QUEUE,
                     "time": NOW - timedelta(hours=2), "exchange": "p.order.placed",
                     "routing-keys": [""]}],
        "x-first-death-reason": "delivery_limit",
        "x-first-death-queue": QUEUE,
        "x-first-death-exchange": "p.order.placed",
    })
    message.headers = headers
    return message


def test_a_kit_dead_letter_says_why_how_often_and_when() -> None:
    """Reason, exception, attempts and failure times come from the kit's x- headers."""
    letter = dead_letter.describe(DLQ, kit_dead_letter())
    assert letter.message_id == EVENT_ID
    assert letter.event_type == "OrderPlaced"
    assert letter.correlation_id == ORDER_ID
    assert letter.reason == "retries_exhausted"
    assert not letter.by_broker
    assert letter.exception == "RuntimeError: the warehouse is down"
    assert letter.attempts == 3
    assert letter.age(NOW) == timedelta(minutes=5)
    assert letter.first_failed_at == NOW - timedelta(minutes=6)
    assert letter.original_queue == QUEUE
    assert letter.body_json()["order_id"] == ORDER_ID
    summary = letter.summary(NOW)
    assert summary["age_seconds"] == 300
    assert summary["queue"] == DLQ
    json.dumps(letter.details())  # everything is JSON-ready


def test_a_broker_dead_letter_explains_the_delivery_limit() -> None:
    """No kit reason applies: the broker parked it after the consumer died on every delivery."""
    letter = dead_letter.describe(DLQ, broker_dead_letter())
    assert letter.by_broker
    assert letter.reason.startswith("delivery limit: the consumer crashed or lost its connection")
    assert letter.attempts is None  # the kit's count is from an earlier failure only
    assert letter.age(NOW) == timedelta(hours=2)
    assert letter.original_queue == QUEUE  # derived from the dead-letter queue's name
    assert isinstance(letter.headers["x-death"][0]["time"], str)
    json.dumps(letter.details())


def test_an_unreadable_body_is_shown_as_text() -> None:
    """A poison message's body is not JSON; it is shown as it is."""
    message = kit_dead_letter(**{"x-error-reason": "poison"})
    message.body = b"{not json"
    letter = dead_letter.describe(DLQ, message)
    assert letter.reason == "poison"
    assert letter.body_json() == "{not json"


def test_a_replayed_copy_starts_over() -> None:
    """Attempts, failure and broker headers go; the replay is stamped and counted."""
    old = dict(broker_dead_letter().headers)
    first = dlq_replay.replay_headers(old, NOW)
    assert not set(first) & dlq_replay.FAILURE_HEADERS
    assert first["schema_version"] == 1
    assert first["x-original-exchange"] == "p.order.placed"
    assert first["x-replay-count"] == 1
    assert first["x-replayed-at"] == NOW.isoformat()
    assert dlq_replay.replay_headers(first, NOW)["x-replay-count"] == 2


def test_a_replay_leaves_a_receipt() -> None:
    """The receipt names the subscriber, its queue, the event and its order flow."""
    letter = dead_letter.describe(DLQ, kit_dead_letter())
    receipt = dlq_replay.replay_receipt(letter, "inventory", NOW)
    assert receipt.outcome == "replayed"
    assert receipt.subscriber == "inventory"
    assert receipt.queue == QUEUE
    assert receipt.handled_event_id == EVENT_ID
    assert receipt.handled_event_type == "OrderPlaced"
    assert receipt.correlation_id == ORDER_ID
    assert str(receipt.causation_id) == EVENT_ID


def test_an_installed_services_dead_letter_queues_come_from_its_declaration() -> None:
    """Inventory consumes OrderPlaced; the order service also owns the audit queue."""
    assert dlq.service_dead_letter_queues("p.", "inventory") == [DLQ]
    order = dlq.service_dead_letter_queues("p.", "order")
    assert "p.audit.tracker.dlq" in order
    assert "p.order.stock.reserved.dlq" in order
    assert all(q.startswith("p.order.") or q == "p.audit.tracker.dlq" for q in order)


async def test_a_service_name_is_checked() -> None:
    """A name that cannot be a service is refused before anything is asked of the broker."""
    with pytest.raises(dlq.DlqError, match="not a service name"):
        await dlq.dead_letter_queues(ServiceSettings(), "*.dlq")


@pytest.mark.parametrize(("seconds", "shown"), [
    (0, "0s"), (42, "42s"), (60, "1m"), (303, "5m 3s"), (3600 * 3 + 600, "3h 10m"),
    (86400 * 2 + 3600 * 4 + 5, "2d 4h"), (-3, "0s"),
])
def test_ages_read_like_people_say_them(seconds: int, shown: str) -> None:
    """Two units at most, the larger first; a clock skew never shows a negative age."""
    assert dlq_cli.format_age(timedelta(seconds=seconds)) == shown


# --- the commands, with the operations replaced by fakes ----------------------------------

class FakeOperations:
    """Stands in for the DLQ tools' broker operations and remembers what was asked."""

    def __init__(self, letters: list[dead_letter.DeadLetter]) -> None:
        self.letters = letters
        self.calls: list[tuple[str, Any]] = []

    async def list_dead_letters(self, _settings: ServiceSettings, service: str, *,
                                limit: int) -> dlq.Listing:
        self.calls.append(("list", service))
        return dlq.Listing(self.letters[:limit], {DLQ: len(self.letters)} if self.letters
                           else {})

    async def find_dead_letters(self, _settings: ServiceSettings, message_id: str
                                ) -> list[dead_letter.DeadLetter]:
        self.calls.append(("find", message_id))
        return [x for x in self.letters if x.message_id == message_id]

    async def replay(self, _settings: ServiceSettings, service: str, *,
                     message_ids: Collection[str] | None) -> dlq_replay.ReplayReport:
        self.calls.append(("replay", None if message_ids is None else sorted(message_ids)))
        chosen = [x for x in self.letters if message_ids is None or x.message_id in message_ids]
        missing = sorted(set(message_ids or ()) - {x.message_id for x in chosen})
        return dlq_replay.ReplayReport(replayed=chosen, not_found=missing)

    async def count_dead_letters(self, _settings: ServiceSettings, service: str
                                 ) -> dict[str, int]:
        self.calls.append(("count", service))
        return {DLQ: len(self.letters)}

    async def purge(self, _settings: ServiceSettings, service: str) -> dict[str, int]:
        self.calls.append(("purge", service))
        return {DLQ: len(self.letters)}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeOperations]:
    def install(*messages: aio_pika.Message) -> FakeOperations:
        operations = FakeOperations([dead_letter.describe(DLQ, m) for m in messages])
        for name in ("list_dead_letters", "find_dead_letters", "count_dead_letters"):
            monkeypatch.setattr(dlq, name, getattr(operations, name))
        for name in ("replay", "purge"):
            monkeypatch.setattr(dlq_replay, name, getattr(operations, name))
        return operations
    return install


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(dlq_cli.app, list(args), input=stdin, env={"COLUMNS": "250"})


def test_list_shows_a_table_of_event_reason_exception_attempts_and_age(
        fake: Callable[..., FakeOperations]) -> None:
    """One row per dead letter, with the broker's reason spelled out when it parked one."""
    fake(kit_dead_letter(), broker_dead_letter())
    result = run("list", "inventory")
    assert result.exit_code == 0, result.output
    assert "dead letters of inventory" in result.stdout
    for column in ("event id", "event type", "reason", "exception", "attempts", "age"):
        assert column in result.stdout
    assert EVENT_ID in result.stdout
    assert "retries_exhausted" in result.stdout
    assert "RuntimeError: the warehouse is down" in result.stdout
    assert "delivery limit: the consumer crashed or lost its connection" in result.stdout


def test_list_json_gives_every_field(fake: Callable[..., FakeOperations]) -> None:
    """--json: the counts per queue and one object per dead letter."""
    fake(kit_dead_letter())
    result = run("list", "inventory", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["counts"] == {DLQ: 1}
    assert data["total"] == 1
    (row,) = data["dead_letters"]
    assert row["event_id"] == EVENT_ID
    assert row["reason"] == "retries_exhausted"
    assert row["attempts"] == 3
    assert row["exception_type"] == "RuntimeError"


def test_list_says_when_there_is_nothing(fake: Callable[..., FakeOperations]) -> None:
    """A service that never ran here has no dead-letter queue yet; that is said, not an error."""
    fake()
    result = run("list", "inventory")
    assert result.exit_code == 0, result.output
    assert "no dead-letter queue" in result.stdout


def test_show_prints_the_headers_and_the_body_pretty(
        fake: Callable[..., FakeOperations]) -> None:
    """The facts, every header, and the JSON body indented."""
    fake(kit_dead_letter())
    result = run("show", EVENT_ID)
    assert result.exit_code == 0, result.output
    assert "x-exception-message" in result.stdout
    assert "the warehouse is down" in result.stdout
    assert f'"order_id": "{ORDER_ID}"' in result.stdout  # indented JSON, one key a line
    assert "replays to" in result.stdout


def test_show_json_and_an_unknown_id(fake: Callable[..., FakeOperations]) -> None:
    """--json lists every copy found; an id no queue holds is an error."""
    fake(kit_dead_letter())
    result = run("show", EVENT_ID, "--json")
    assert result.exit_code == 0, result.output
    (copy,) = json.loads(result.stdout)
    assert copy["headers"]["x-error-reason"] == "retries_exhausted"
    assert copy["body"]["event_id"] == EVENT_ID
    missing = run("show", "nope")
    assert missing.exit_code == 1
    assert "no dead letter with id nope" in missing.output


@pytest.mark.parametrize("args", [(), ("--id", "x", "--all")])
def test_replay_needs_either_ids_or_all(fake: Callable[..., FakeOperations],
                                        args: tuple[str, ...]) -> None:
    """Neither or both of --id and --all: refused before anything is replayed."""
    operations = fake(kit_dead_letter())
    result = run("replay", "inventory", *args)
    assert result.exit_code == 1
    assert "--id ID" in result.output
    assert operations.calls == []


def test_replay_reports_each_message_and_fails_on_an_unknown_id(
        fake: Callable[..., FakeOperations]) -> None:
    """Replayed ids are printed with their queue; an id not found makes the exit status 1."""
    operations = fake(kit_dead_letter())
    result = run("replay", "inventory", "--id", EVENT_ID, "--id", "gone")
    assert operations.calls == [("replay", sorted([EVENT_ID, "gone"]))]
    assert f"replayed {EVENT_ID} (OrderPlaced) to {QUEUE}" in result.stdout
    assert "no dead letter with id gone" in result.output
    assert result.exit_code == 1
    everything = run("replay", "inventory", "--all")
    assert everything.exit_code == 0, everything.output
    assert "1 dead letter of inventory replayed" in everything.stdout


@pytest.mark.parametrize("stdin", [None, "n\n", "\n"])
def test_purge_without_yes_asks_and_a_missing_or_negative_answer_keeps_everything(
        fake: Callable[..., FakeOperations], stdin: str | None) -> None:
    """No terminal, "n" or just Enter: nothing is purged and the exit status says so."""
    operations = fake(kit_dead_letter())
    result = run("purge", "inventory", stdin=stdin)
    assert result.exit_code == 1
    assert "nothing purged" in result.output
    assert ("purge", "inventory") not in operations.calls


def test_purge_purges_after_a_yes_or_with_the_yes_option(
        fake: Callable[..., FakeOperations]) -> None:
    """"y" at the prompt, or --yes without one: purged, and how many is said."""
    operations = fake(kit_dead_letter())
    asked = run("purge", "inventory", stdin="y\n")
    assert asked.exit_code == 0, asked.output
    assert "Delete 1 dead letter of inventory" in asked.stdout
    assert "purged 1 dead letter of inventory" in asked.stdout
    operations.calls.clear()
    scripted = run("purge", "inventory", "--yes")
    assert scripted.exit_code == 0, scripted.output
    assert operations.calls == [("purge", "inventory")]  # not even counted first
    assert "purged 1 dead letter of inventory" in scripted.stdout


def test_an_operation_error_is_one_line_and_status_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DlqError (unknown service, broker away) prints `Error: ...`, no traceback."""
    async def refuse(*_args: Any, **_kwargs: Any) -> dlq.Listing:
        raise dlq.DlqError("no dead-letter queues for service 'loyalty'")

    monkeypatch.setattr(dlq, "list_dead_letters", refuse)
    result = run("list", "loyalty")
    assert result.exit_code == 1
    assert "Error: no dead-letter queues for service 'loyalty'" in result.output
    assert "Traceback" not in result.output
