"""Fixtures for tests on a real broker: services run in-process under a unique name prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from common.kit.db import create_tables, make_engine
from common.kit.declare import Service
from common.kit.runner import Runtime, ServiceRunner
from common.kit.service import ServiceSpec
from common.kit.settings import ServiceSettings
from order_service.settings import OrderSettings
from order_service.store.tables import metadata
from tests.integration.support import (
    FakeRuntime,
    StartService,
    delete_topology,
    settings_for,
)


@pytest.fixture
async def amqp(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A plain connection for the test itself (publishing raw messages, inspecting queues)."""
    connection = await aio_pika.connect_robust(amqp_url)
    yield connection
    await connection.close()


@pytest.fixture
async def start_service(amqp_url: str, management_url: str, name_prefix: str, tmp_path: Path
                        ) -> AsyncIterator[StartService]:
    """Start services in-process (a declared `Service`, or a bare spec with its settings
    class); stop them and delete everything they declared afterwards."""
    runners: list[ServiceRunner[Any]] = []

    async def start(service: Service[Any] | ServiceSpec[Any],
                    settings_cls: type[ServiceSettings] = ServiceSettings,
                    **overrides: Any) -> Runtime[Any]:
        if isinstance(service, Service):
            settings_cls = service.settings_class
        settings = settings_for(settings_cls, amqp_url, name_prefix, tmp_path, **overrides)
        spec = service.spec(settings) if isinstance(service, Service) else service
        runner = ServiceRunner(spec, settings, broker_wait=10)
        runners.append(runner)
        return await runner.__aenter__()

    yield start
    for runner in reversed(runners):
        await runner.stop()
    await delete_topology(amqp_url, [r.topology for r in runners], name_prefix, management_url)


@pytest.fixture
async def runtime(db_url: str, settings: OrderSettings) -> AsyncIterator[FakeRuntime]:
    """The order API's runtime without a broker, on SQLite and PostgreSQL (`settings`: the
    module's own)."""
    engine = make_engine(db_url)
    await create_tables(engine, metadata)
    yield FakeRuntime(engine, settings)
    await engine.dispose()
