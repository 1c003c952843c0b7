"""`shop new subscriber` asks the real broker which queues it holds before taking a name."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import aio_pika
import pytest

from common.kit.settings import ServiceSettings
from common.ops import scaffold, scaffold_cli
from common.ops.scaffold import RefusedError

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The files the command reads, copied."""
    for path in ("pyproject.toml", "docker-compose.yml", "deploy/prometheus.yml"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, tmp_path / path)
    return tmp_path


async def test_a_queue_a_retired_service_left_on_the_broker_refuses_its_name(
        repo: Path, amqp: aio_pika.abc.AbstractRobustConnection, amqp_url: str,
        management_url: str, name_prefix: str) -> None:
    """A queue named `<prefix>relic.<event>` on the broker refuses the name relic, saying
    which queue; once it is deleted, the name is free."""
    settings = ServiceSettings(amqp_url=amqp_url, management_url=management_url,
                               name_prefix=name_prefix)

    def make() -> scaffold.Plan:
        return scaffold.plan(repo, "relic", ["OrderPlaced"], prefix=name_prefix,
                             broker_queues=lambda: scaffold_cli.broker_queues_of(settings))

    channel = await amqp.channel()
    queue = f"{name_prefix}relic.stock.reserved"
    left = await channel.declare_queue(queue, durable=True)
    try:
        with pytest.raises(RefusedError, match=re.escape(f"such as {queue}")):
            await asyncio.to_thread(make)
    finally:
        await left.delete(if_unused=False, if_empty=False)
    made = await asyncio.to_thread(make)
    assert made.name == "relic"


def test_without_a_broker_the_name_is_taken_on_the_static_checks_alone(repo: Path) -> None:
    """When the management API does not answer, the broker's queues are not checked (a
    warning says so) and the name passes on what the code tells."""
    settings = ServiceSettings(management_url="http://guest:guest@127.0.0.1:9/",
                               name_prefix="nobroker.")
    assert scaffold_cli.broker_queues_of(settings) is None
    made = scaffold.plan(repo, "relic", ["OrderPlaced"], prefix="nobroker.",
                         broker_queues=lambda: scaffold_cli.broker_queues_of(settings))
    assert made.name == "relic"
