"""What `common.kit.broker.connect` logs about its connection: nothing for a close asked for, one
line when the broker drops it and one when it is back."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping, Sequence
from typing import Any
from urllib.parse import quote
from uuid import uuid4

import pytest
from structlog.testing import capture_logs
from yarl import URL

from common.kit.broker import connect
from common.kit.settings import ServiceSettings
from common.ops.observe import ManagementApi
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

LOST = "broker connection lost; reconnecting"
RESTORED = "broker connection restored"


def _events(logs: Sequence[MutableMapping[str, Any]], event: str
            ) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line["event"] == event]


async def test_connections_closed_on_purpose_log_no_outage(amqp_url: str) -> None:
    """Twenty connections opened and closed at once (the timing of a busy machine, where
    the client's close callbacks see no exception): no outage is logged."""

    async def open_and_close(number: int) -> None:
        connection = await connect(amqp_url, f"t-quiet-{uuid4().hex[:8]}-{number}", wait=10)
        channel = await connection.channel()
        await channel.declare_queue("", exclusive=True)
        await connection.close()

    with capture_logs() as logs:
        await asyncio.gather(*(open_and_close(n) for n in range(20)))
    assert _events(logs, LOST) == []


async def test_a_connection_the_broker_closes_is_reported_lost_then_restored(
        amqp_url: str, management_url: str) -> None:
    """The broker closing our connection (as `rabbitmqctl close_connection` does) logs one
    warning with its reason and, once reconnected, one line with the time it was down; the
    close asked for afterwards logs nothing more."""
    name = f"t-dropped-{uuid4().hex[:8]}"
    api = ManagementApi.of(ServiceSettings(amqp_url=amqp_url, management_url=management_url))
    # Reconnect at once rather than after the default 5 s.
    url = str(URL(amqp_url).update_query(reconnect_interval="0.2"))
    with capture_logs() as logs:
        connection = await connect(url, name, wait=10)
        try:
            async with api.client() as client:

                async def on_broker() -> str | None:
                    listed = await client.get(api.path("connections"),
                                              params={"columns": "name,client_properties"})
                    listed.raise_for_status()
                    return next((c["name"] for c in listed.json()
                                 if c["client_properties"].get("connection_name") == name),
                                None)

                broker_name = await wait_for(on_broker, timeout=15, interval=0.2,
                                             what=f"the broker to list connection {name}")
                closed = await client.delete(
                    f"{api.base}/api/connections/{quote(broker_name, safe='')}",
                    headers={"X-Reason": "closed by the test"})
                assert closed.status_code == 204, closed.text

            async def restored() -> bool:
                return bool(_events(logs, RESTORED))

            await wait_for(restored, timeout=15, what="the connection to be restored")
        finally:
            await connection.close()
    [lost] = _events(logs, LOST)
    assert "closed by the test" in lost["reason"]
    [back] = _events(logs, RESTORED)
    assert back["down_s"] is not None
    assert logs.index(lost) < logs.index(back)
