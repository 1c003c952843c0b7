"""`shop dlq` on a real RabbitMQ: dead letters listed, shown, replayed once, purged, never lost."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import structlog
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection
from typer.testing import CliRunner, Result

from common.events import DeliveryReceipt, Event, OrderPlaced, SubscriberAnnounced
from common.kit.broker import message_for
from common.kit.runner import Runtime
from common.kit.service import ServiceSpec
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops import dlq, dlq_cli
from common.ops.observe import sweep_prefix
from tests.factories import make_order
from tests.integration.support import StartService, receipts_in, wait_for
from tests.integration.test_kit import ProbeStore, effects, probe_metadata

pytestmark = pytest.mark.integration

# The probe subscriber's store is the kit tests' one: one row per effect.
metadata = probe_metadata


class Fault:
    """The probe's downstream: broken until the test fixes it."""

    def __init__(self) -> None:
        self.broken = True


def probe(fault: Fault, name: str = "dlqprobe") -> ServiceSpec[ProbeStore]:
    """A subscriber (not a built-in one) whose handler fails while the fault lasts."""

    async def record(event: OrderPlaced, store: ProbeStore) -> Sequence[Event]:
        if fault.broken:
            raise RuntimeError("the downstream is broken")
        await store.record(event.order_id)
        return []

    # It publishes the test's orders from its own outbox (`publish`), so it produces them.
    return ServiceSpec(name=name, handlers={OrderPlaced: record}, store=ProbeStore,
                       metadata=metadata, produces=(OrderPlaced,))


@pytest.fixture(autouse=True)
def service_logs_off_the_cli_output() -> Iterator[None]:
    """In-process services log to the real stderr, so CliRunner's stdout is the CLI's alone."""
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.__stderr__))
    yield
    structlog.configure(**saved)


@pytest.fixture
def settings(amqp_url: str, management_url: str, name_prefix: str) -> ServiceSettings:
    """What `shop dlq` reads from the environment, for this test's prefix."""
    return ServiceSettings(amqp_url=amqp_url, management_url=management_url,
                           name_prefix=name_prefix)


@pytest.fixture
def env(amqp_url: str, management_url: str, name_prefix: str) -> dict[str, str]:
    """The same, as the environment variables `shop dlq` is run with."""
    return {"AMQP_URL": amqp_url, "RABBITMQ_MANAGEMENT_URL": management_url,
            "SHOP_NAME_PREFIX": name_prefix, "COLUMNS": "250"}


@pytest.fixture
async def swept(management_url: str, name_prefix: str) -> AsyncIterator[None]:
    """Deletes every queue and exchange under the test's prefix afterwards."""
    yield
    await asyncio.to_thread(sweep_prefix, management_url, name_prefix)


async def shop(env: dict[str, str], *args: str, stdin: str | None = None) -> Result:
    """`shop dlq ARGS` with `env`, in a thread: the command runs its own event loop."""
    return await asyncio.to_thread(CliRunner().invoke, dlq_cli.app, list(args), input=stdin,
                                   env=env)


async def publish(runtime: Runtime[Any], *events: Event) -> None:
    async def work(_conn: AsyncConnection) -> Sequence[Event]:
        return list(events)

    await runtime.execute(work)


async def effect_count(runtime: Runtime[Any], order_id: uuid.UUID) -> int:
    async with runtime.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(effects).where(
            effects.c.order_id == str(order_id)))).scalar_one())


async def ready(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    """Messages ready in `queue` (a passive declare: reads nothing)."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def dead_lettered(connection: aio_pika.abc.AbstractConnection, queue: str,
                        expected: int) -> None:
    """Wait until `<queue>.dlq` holds `expected` messages (after every retry)."""
    async def probe() -> bool:
        return await ready(connection, f"{queue}.dlq") >= expected

    await wait_for(probe, timeout=20, what=f"{expected} dead letters in {queue}.dlq")
    assert await ready(connection, f"{queue}.dlq") == expected


async def receipts_until(connection: aio_pika.abc.AbstractConnection, audit_queue: str,
                         *wanted: tuple[str, str]) -> list[DeliveryReceipt]:
    """Every receipt on the audit queue, in arrival order, until one of each wanted
    (event id, outcome) has arrived."""
    channel = await connection.channel()
    audit = await channel.declare_queue(audit_queue, passive=True)
    found: list[DeliveryReceipt] = []

    async def collect() -> bool:
        message = await audit.get(fail=False)
        if message is not None:
            await message.ack()
            found.extend(receipts_in(message))
        return set(wanted) <= {(r.handled_event_id or "", r.outcome) for r in found}

    await wait_for(collect, timeout=15, what=f"receipts {wanted}")
    await channel.close()
    return found


async def test_a_dead_letter_is_listed_shown_then_replayed_and_handled_once(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection,
        env: dict[str, str]) -> None:
    """After its retries the event waits in the DLQ with its reason; fixed and replayed, it is
    handled exactly once, and a "replayed" receipt records the replay."""
    fault = Fault()
    # One delivery at a time, so anything the replay sent is handled before the marker below.
    runtime = await start_service(probe(fault), prefetch=1)
    queue = runtime.topology.queue("dlqprobe", OrderPlaced)
    order = make_order(producer="test")
    event_id = str(order.event_id)
    await publish(runtime, order)
    await dead_lettered(amqp, queue, 1)

    listed = await shop(env, "list", "dlqprobe", "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)["dead_letters"]
    assert row["event_id"] == event_id
    assert row["event_type"] == "OrderPlaced"
    assert row["reason"] == "retries_exhausted"
    assert row["attempts"] == 3  # the first try and the two retries of settings_for
    assert row["exception_type"] == "RuntimeError"
    assert row["original_queue"] == queue
    table = await shop(env, "list", "dlqprobe")
    assert table.exit_code == 0, table.output
    assert event_id in table.stdout
    assert "retries_exhausted" in table.stdout
    assert "RuntimeError: the downstream is broken" in table.stdout

    shown = await shop(env, "show", event_id, "--json")
    assert shown.exit_code == 0, shown.output
    (copy,) = json.loads(shown.stdout)
    assert copy["queue"] == f"{queue}.dlq"
    assert copy["headers"]["x-exception-message"] == "the downstream is broken"
    assert copy["headers"]["x-service"] == "dlqprobe"
    assert OrderPlaced.model_validate(copy["body"]) == order
    pretty = await shop(env, "show", event_id)
    assert pretty.exit_code == 0, pretty.output
    assert f'"order_id": "{order.order_id}"' in pretty.stdout

    fault.broken = False
    replayed = await shop(env, "replay", "dlqprobe", "--id", event_id)
    assert replayed.exit_code == 0, replayed.output
    assert f"replayed {event_id} (OrderPlaced) to {queue}" in replayed.stdout
    assert await ready(amqp, f"{queue}.dlq") == 0  # acked once the copy was confirmed

    marker = make_order(producer="test")
    await publish(runtime, marker)
    await wait_for(lambda: effect_count(runtime, marker.order_id), what="the marker's effect")
    assert await effect_count(runtime, order.order_id) == 1
    # The replayed copy (and any second copy) was handled, and its receipt committed, before
    # the marker's: every receipt about the event is in by the marker's.
    receipts = await receipts_until(amqp, runtime.topology.audit_queue,
                                    (str(marker.event_id), "handled"), (event_id, "handled"),
                                    (event_id, "replayed"))
    outcomes = [r.outcome for r in receipts if r.handled_event_id == event_id]
    assert sorted(outcomes) == sorted(["retried", "retried", "dead_lettered", "replayed",
                                       "handled"])  # no second copy, so no "duplicate"
    (trace,) = [r for r in receipts if r.outcome == "replayed"]
    assert trace.handled_event_id == event_id
    assert trace.subscriber == "dlqprobe"
    assert trace.queue == queue
    assert trace.handled_event_type == "OrderPlaced"
    assert trace.correlation_id == str(order.order_id)


async def test_browsing_leaves_every_dead_letter_in_place_and_in_order(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection,
        settings: ServiceSettings, env: dict[str, str]) -> None:
    """Listing twice (the operation and the command) takes nothing and reorders nothing."""
    runtime = await start_service(probe(Fault()))
    queue = runtime.topology.queue("dlqprobe", OrderPlaced)
    await publish(runtime, *(make_order(producer="test") for _ in range(3)))
    await dead_lettered(amqp, queue, 3)

    first = await dlq.list_dead_letters(settings, "dlqprobe")
    second = await dlq.list_dead_letters(settings, "dlqprobe")
    assert first.counts == second.counts == {f"{queue}.dlq": 3}
    assert [x.message_id for x in first.letters] == [x.message_id for x in second.letters]
    assert len({x.message_id for x in first.letters}) == 3
    for _ in range(2):
        listed = await shop(env, "list", "dlqprobe", "--json")
        assert listed.exit_code == 0, listed.output
        ids = [row["event_id"] for row in json.loads(listed.stdout)["dead_letters"]]
        assert ids == [x.message_id for x in first.letters]
    assert await ready(amqp, f"{queue}.dlq") == 3
    limited = await dlq.list_dead_letters(settings, "dlqprobe", limit=2)
    assert [x.message_id for x in limited.letters] == [x.message_id for x in first.letters[:2]]
    assert limited.total == 3
    assert await ready(amqp, f"{queue}.dlq") == 3


async def test_replaying_an_unknown_id_replays_nothing(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection,
        env: dict[str, str]) -> None:
    """An id the service's dead-letter queues do not hold: status 1, the others untouched."""
    runtime = await start_service(probe(Fault()))
    queue = runtime.topology.queue("dlqprobe", OrderPlaced)
    await publish(runtime, make_order(producer="test"))
    await dead_lettered(amqp, queue, 1)
    result = await shop(env, "replay", "dlqprobe", "--id", "no-such-id")
    assert result.exit_code == 1
    assert "no dead letter with id no-such-id" in result.output
    assert await ready(amqp, f"{queue}.dlq") == 1


async def test_show_finds_the_event_in_every_service_that_dead_lettered_it(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection,
        settings: ServiceSettings, tmp_path: Path) -> None:
    """One event reaches two subscribers and fails in both: both copies are found by its id."""
    fault = Fault()
    first = await start_service(probe(fault, "dlqprobe"))
    await start_service(probe(fault, "dlqother"),
                        database_url=f"sqlite+aiosqlite:///{tmp_path / 'other.db'}")
    order = make_order(producer="test")
    await publish(first, order)
    for service in ("dlqprobe", "dlqother"):
        await dead_lettered(amqp, first.topology.queue(service, OrderPlaced), 1)
    found = await dlq.find_dead_letters(settings, str(order.event_id))
    assert sorted(x.dlq for x in found) == sorted(
        f"{first.topology.queue(s, OrderPlaced)}.dlq" for s in ("dlqprobe", "dlqother"))
    assert await dlq.find_dead_letters(settings, str(uuid.uuid4())) == []


async def test_purge_asks_first_and_with_yes_empties_the_dead_letter_queue(
        start_service: StartService, amqp: aio_pika.abc.AbstractRobustConnection,
        env: dict[str, str]) -> None:
    """No answer (no terminal) or "n": nothing is purged; --yes purges and says how many."""
    runtime = await start_service(probe(Fault()))
    queue = runtime.topology.queue("dlqprobe", OrderPlaced)
    await publish(runtime, make_order(producer="test"), make_order(producer="test"))
    await dead_lettered(amqp, queue, 2)

    for stdin in (None, "n\n"):
        refused = await shop(env, "purge", "dlqprobe", stdin=stdin)
        assert refused.exit_code == 1
        assert "nothing purged" in refused.output
        assert await ready(amqp, f"{queue}.dlq") == 2
    purged = await shop(env, "purge", "dlqprobe", "--yes")
    assert purged.exit_code == 0, purged.output
    assert "purged 2 dead letters of dlqprobe" in purged.stdout
    assert await ready(amqp, f"{queue}.dlq") == 0


async def test_a_broker_dead_letter_is_explained_and_replayed_with_its_attempts_reset(
        amqp: aio_pika.abc.AbstractRobustConnection, settings: ServiceSettings,
        env: dict[str, str], name_prefix: str, swept: None) -> None:
    """A delivery that kills its consumer every time is parked by the broker (delivery limit);
    `list` says so, and `replay --all` returns it clean: no x-death, attempts or error."""
    topology = Topology(name_prefix, delivery_limit=2, retry_delays=(1.0,))
    channel = await amqp.channel()
    exchange = await topology.declare_event_exchange(channel, OrderPlaced)
    queue = topology.queue("crashy", OrderPlaced)
    await topology.declare_subscriber_queue(channel, queue, exchange)
    audit = await topology.declare_event_exchange(channel, SubscriberAnnounced)
    await topology.declare_subscriber_queue(channel, topology.audit_queue, audit)
    order = make_order(producer="test")
    # As after one handled failure: the kit's headers ride along until the broker gives up.
    await exchange.publish(message_for(order, headers={
        "schema_version": 1, "x-attempts": 1, "x-error-reason": "handler_error",
        "x-exception-type": "MemoryError", "x-original-exchange": exchange.name}),
        routing_key="")
    subscribed = await channel.declare_queue(queue, passive=True)

    async def crash_once() -> bool:  # a consumer that dies before it acks: back in the queue
        message = await subscribed.get(fail=False)
        if message is not None:
            await message.nack(requeue=True)
        return await ready(amqp, f"{queue}.dlq") == 1

    await wait_for(crash_once, what="the broker to dead-letter after the delivery limit")

    (letter,) = (await dlq.list_dead_letters(settings, "crashy")).letters
    assert letter.by_broker
    assert letter.attempts is None
    assert letter.reason.startswith("delivery limit: the consumer crashed")
    listed = await shop(env, "list", "crashy")
    assert listed.exit_code == 0, listed.output
    assert "delivery limit: the consumer crashed" in listed.stdout

    replayed = await shop(env, "replay", "crashy", "--all")
    assert replayed.exit_code == 0, replayed.output
    assert "1 dead letter of crashy replayed" in replayed.stdout
    assert await ready(amqp, f"{queue}.dlq") == 0
    back = await wait_for(lambda: subscribed.get(fail=False), what="the replayed copy")
    await back.ack()
    assert back.body == message_for(order).body
    assert back.message_id == str(order.event_id)
    assert back.correlation_id == str(order.order_id)
    assert back.type == "OrderPlaced"
    headers = dict(back.headers)
    assert not {"x-death", "x-first-death-reason", "x-attempts", "x-error-reason",
                "x-exception-type"} & headers.keys()
    assert headers["x-replay-count"] == 1
    assert "x-replayed-at" in headers
    assert headers["x-original-exchange"] == exchange.name
    (trace,) = await receipts_until(amqp, topology.audit_queue,
                                    (str(order.event_id), "replayed"))
    assert trace.subscriber == "crashy"
    assert trace.queue == queue


async def test_a_service_without_dead_letter_queues_is_an_error(env: dict[str, str]) -> None:
    """A name no built-in service has and the broker has no queues for: said, status 1."""
    result = await shop(env, "list", "nosuchservice")
    assert result.exit_code == 1
    assert "no dead-letter queues for service 'nosuchservice'" in result.output


async def test_without_the_management_api_another_service_cannot_be_found(
        env: dict[str, str]) -> None:
    """Finding a later subscriber's queues needs the management API; when it does not answer,
    the error names it and the setting."""
    result = await shop({**env, "RABBITMQ_MANAGEMENT_URL": "http://127.0.0.1:9/"},
                        "list", "loyalty")
    assert result.exit_code == 1
    assert "management API" in result.output
    assert "RABBITMQ_MANAGEMENT_URL" in result.output


async def test_a_built_in_service_that_never_ran_here_has_nothing_to_list(
        env: dict[str, str]) -> None:
    """Its queues come from its handler table; none is declared under this prefix yet."""
    result = await shop(env, "list", "inventory")
    assert result.exit_code == 0, result.output
    assert "no dead-letter queue" in result.stdout


async def test_a_replay_nobody_can_route_leaves_the_dead_letter_where_it_was(
        amqp: aio_pika.abc.AbstractRobustConnection, env: dict[str, str], name_prefix: str,
        swept: None) -> None:
    """The service's queue is gone: the mandatory publish comes back, so the dead letter is
    not acked; it stays, and the exit status says so."""
    topology = Topology(name_prefix)
    channel = await amqp.channel()
    exchange = await topology.declare_event_exchange(channel, OrderPlaced)
    queue = topology.queue("gone", OrderPlaced)
    await topology.declare_subscriber_queue(channel, queue, exchange)
    await channel.queue_delete(queue)
    order = make_order(producer="test")
    dead_letters = await channel.get_exchange(topology.dead_letter_exchange(queue))
    await dead_letters.publish(message_for(order, headers={
        "x-error-reason": "retries_exhausted", "x-attempts": 3, "x-original-queue": queue}),
        routing_key=topology.dlq(queue))
    await dead_lettered(amqp, queue, 1)

    result = await shop(env, "replay", "gone", "--all")
    assert result.exit_code == 1
    assert f"{order.event_id} stays in {queue}.dlq" in result.output
    assert "0 dead letters of gone replayed" in result.stdout
    assert await ready(amqp, f"{queue}.dlq") == 1
