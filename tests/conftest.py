"""Fixtures every tier shares: where the tests find a RabbitMQ and PostgreSQL, unique names."""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit
from uuid import uuid4

import aio_pika
import pytest

from tests.storage import (
    HOW_TO_GET_POSTGRES,
    postgres_problem,
    postgres_schema,
    postgres_url,
    redact,
    sqlite_url,
)

if TYPE_CHECKING:
    from testcontainers.community.rabbitmq import RabbitMqContainer

LOCAL_AMQP_URL = "amqp://guest:guest@localhost:5672/"
LOCAL_MANAGEMENT_URL = "http://guest:guest@localhost:15672/"
# The same image as docker-compose.yml, so the tests meet the broker users run.
RABBITMQ_IMAGE = "rabbitmq:3.13-management"
PROBE_TIMEOUT = 5.0  # seconds for one connection attempt while looking for a broker

HOW_TO_GET_A_BROKER = """\
The integration and e2e tests need a RabbitMQ. Any one of these will do:
  * run `scripts/ensure-broker` (it starts one with Docker or a local rabbitmq-server);
  * start a local one: `rabbitmq-server -detached` (Debian: apt-get install rabbitmq-server);
  * with Docker: `docker run -d -p 5672:5672 -p 15672:15672 rabbitmq:3.13-management`
    (or leave it to these tests: they start one with testcontainers when Docker runs);
  * point at one elsewhere: `export AMQP_URL=amqp://USER:PASSWORD@HOST:5672/`."""


@dataclass(frozen=True)
class Broker:
    """A RabbitMQ the tests can use, and where it was found."""

    amqp_url: str
    management_url: str
    source: str  # "AMQP_URL", "localhost" or "testcontainers"


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def _open_and_close(url: str) -> None:
    connection = await aio_pika.connect(url, timeout=PROBE_TIMEOUT)
    await connection.close()


def _connection_problem(url: str) -> str | None:
    """Why an AMQP connection to `url` does not open, or None when it does."""
    # The probe runs on an event loop of its own in a worker thread, so it never touches the
    # loops pytest-asyncio creates for the tests.
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pool.submit(asyncio.run, _open_and_close(url)).result(timeout=PROBE_TIMEOUT * 3)
        except Exception as exc:  # any failure means "not usable"; the reason goes in the message
            return f"{type(exc).__name__}: {exc}"
    return None


def _management_url_beside(amqp_url: str) -> str:
    """The management API a broker at `amqp_url` serves by default (same host and user)."""
    parts = urlsplit(amqp_url)
    user = f"{parts.username or 'guest'}:{parts.password or 'guest'}@"
    return f"http://{user}{parts.hostname or 'localhost'}:15672/"


def _start_container() -> RabbitMqContainer:
    """Start RabbitMQ in Docker with testcontainers; raises when no engine runs."""
    with warnings.catch_warnings():
        # testcontainers 4.15 deprecates its own readiness decorator, which its RabbitMQ
        # module still uses at import: not ours to fix, and our "error" filter would fail on it.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from testcontainers.community.rabbitmq import RabbitMqContainer
        except ImportError:  # older testcontainers releases kept it at the top level
            from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer(RABBITMQ_IMAGE).with_exposed_ports(15672)
        container.start()
    return container


def _container_broker(container: RabbitMqContainer) -> Broker:
    """aio-pika and management URLs for a started container.

    RabbitMqContainer hands back pika connection parameters; aio-pika wants a URL, built from
    the container's host and the mapped ports.
    """
    host = container.get_container_host_ip()
    user = f"{quote(container.username, safe='')}:{quote(container.password, safe='')}"
    vhost = "" if container.vhost == "/" else quote(container.vhost, safe="")
    amqp_port = container.get_exposed_port(container.port)
    management_port = container.get_exposed_port(15672)
    return Broker(
        amqp_url=f"amqp://{user}@{host}:{amqp_port}/{vhost}",
        management_url=f"http://{user}@{host}:{management_port}/",
        source="testcontainers",
    )


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """The RabbitMQ for this test session.

    In order: AMQP_URL when set (it must answer); else the one on localhost:5672 if it
    answers; else a container started with testcontainers when Docker runs; else the session's
    broker tests fail with a message saying how to get one.
    """
    management_env = os.environ.get("RABBITMQ_MANAGEMENT_URL")

    env_url = os.environ.get("AMQP_URL")
    if env_url:
        problem = _connection_problem(env_url)
        if problem is not None:
            pytest.fail(
                f"AMQP_URL={_redact(env_url)} does not answer ({problem}).\n\n"
                f"{HOW_TO_GET_A_BROKER}",
                pytrace=False,
            )
        yield Broker(env_url, management_env or _management_url_beside(env_url), "AMQP_URL")
        return

    local_problem = _connection_problem(LOCAL_AMQP_URL)
    if local_problem is None:
        yield Broker(LOCAL_AMQP_URL, management_env or LOCAL_MANAGEMENT_URL, "localhost")
        return

    try:
        container = _start_container()
    except Exception as exc:  # no engine, no image, ...: say so with both reasons
        pytest.fail(
            f"No RabbitMQ for the tests: {_redact(LOCAL_AMQP_URL)} does not answer "
            f"({local_problem}), and starting one with testcontainers failed "
            f"({type(exc).__name__}: {exc}).\n\n{HOW_TO_GET_A_BROKER}",
            pytrace=False,
        )
    try:
        yield _container_broker(container)
    finally:
        container.stop()


@pytest.fixture(scope="session")
def amqp_url(broker: Broker) -> str:
    """The aio-pika URL of the session's RabbitMQ (integration and e2e tests only)."""
    return broker.amqp_url


@pytest.fixture(scope="session")
def management_url(broker: Broker) -> str:
    """The management HTTP API of the session's RabbitMQ, for queue counts (`shop queues`)."""
    return broker.management_url


@pytest.fixture
def name_prefix() -> str:
    """A prefix for exchange and queue names unique to this test, so tests share a broker."""
    return f"t{uuid4().hex[:8]}."


@pytest.fixture(scope="session")
def postgres() -> str:
    """The URL of the PostgreSQL database for this session (POSTGRES_URL, or the local `test`).

    When it does not answer: in CI (the CI variable set) the tests that need it fail with a
    message saying how to start it; elsewhere they are skipped with the reason.
    """
    url = postgres_url()
    problem = postgres_problem(url)
    if problem is not None:
        message = f"PostgreSQL at {redact(url)} does not answer ({problem})."
        if os.environ.get("CI"):
            pytest.fail(f"{message}\n\n{HOW_TO_GET_POSTGRES}", pytrace=False)
        pytest.skip(f"{message} Set POSTGRES_URL or start it; CI fails here instead.")
    return url


@pytest.fixture
async def postgres_db_url(postgres: str) -> AsyncIterator[str]:
    """A URL into a PostgreSQL schema of this test's own, dropped (CASCADE) afterwards."""
    async with postgres_schema(postgres) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database URL for a storage test, once on an SQLite file and once on PostgreSQL.

    The PostgreSQL run gets a schema of its own (dropped afterwards); the parameter carries
    the integration marker, since it needs a server.
    """
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "store.db")
        return
    async with postgres_schema(request.getfixturevalue("postgres")) as url:
        yield url
