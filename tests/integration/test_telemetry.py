"""Traces and metrics on a real broker: one order is one trace across all four services."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from common.events import OrderPlaced
from common.kit.settings import ServiceSettings
from common.kit.telemetry import start_metrics_server
from tests.integration.support import StartService, free_port, wait_for
from tests.integration.test_order_flow import (
    _with_outcomes,
    complete,
    new_order,
    place,
    start_system,
)

pytestmark = pytest.mark.integration

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter behind the global tracer provider (which can be set once)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    yield _EXPORTER
    # The provider stays for the session (it cannot be replaced); stop collecting into memory.
    _EXPORTER.clear()
    _EXPORTER.shutdown()


async def test_one_order_is_one_trace_across_all_four_services(
        start_service: StartService, spans: InMemorySpanExporter) -> None:
    """The publish of OrderPlaced, every consumer's processing, the outcome events and the
    receipts share one trace id, with spans from order, inventory, logistics and seller."""
    rts = await start_system(start_service)
    spans.clear()
    event = await place(rts["order"], new_order(("SKU-BOOK-1", 1, "12.50", "seller-books")))
    await wait_for(lambda: complete(rts["order"], event.order_id), what="every subscriber")
    await wait_for(lambda: _with_outcomes(rts["order"], event.order_id,
                                          {"stock_reserved", "shipment", "seller"}),
                   what="the outcomes to reach the order service")
    finished = spans.get_finished_spans()
    [send] = [s for s in finished if s.kind == trace.SpanKind.PRODUCER
              and (s.attributes or {}).get("messaging.message.id") == str(event.event_id)]
    trace_id = send.context.trace_id
    in_trace = [s for s in finished if s.context.trace_id == trace_id]
    services = {(s.attributes or {}).get("shop.service") for s in in_trace}
    assert {"order", "inventory", "logistics", "seller"} <= services
    processed = {(s.attributes or {}).get("shop.service") for s in in_trace
                 if s.kind == trace.SpanKind.CONSUMER
                 and (s.attributes or {}).get("shop.event_type") == "OrderPlaced"}
    assert processed == {"inventory", "logistics", "seller"}
    consumer = next(s for s in in_trace if s.kind == trace.SpanKind.CONSUMER)
    assert (consumer.attributes or {})["messaging.system"] == "rabbitmq"
    assert (consumer.attributes or {})["messaging.operation.type"] == "process"


async def test_deliveries_and_confirms_are_counted(start_service: StartService) -> None:
    """Handling an order moves the delivery counter and the confirm-latency histogram."""
    def handled() -> float:
        return REGISTRY.get_sample_value(
            "shop_deliveries_total",
            {"service": "inventory", "queue": rts["inventory"].topology.queue(
                "inventory", OrderPlaced), "event_type": "OrderPlaced",
             "outcome": "handled"}) or 0.0

    rts = await start_system(start_service)
    before = handled()
    confirms_before = REGISTRY.get_sample_value(
        "shop_publish_confirm_seconds_count",
        {"service": "order", "event_type": "OrderPlaced"}) or 0.0
    event = await place(rts["order"], new_order(("SKU-BOOK-1", 1, "12.50", "seller-books")))
    await wait_for(lambda: complete(rts["order"], event.order_id), what="every subscriber")
    assert handled() == before + 1
    assert (REGISTRY.get_sample_value(
        "shop_publish_confirm_seconds_count",
        {"service": "order", "event_type": "OrderPlaced"}) or 0.0) == confirms_before + 1


def test_metrics_listen_on_loopback_unless_told_otherwise() -> None:
    """With the default settings /metrics is served on 127.0.0.1 only, and answers there."""
    settings = ServiceSettings()
    server = start_metrics_server(settings.metrics_host, free_port(), "probe")
    assert server is not None
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert answer.status_code == 200
        assert "shop_deliveries_total" in answer.text
    finally:
        server.shutdown()
        server.server_close()
