"""Metrics (Prometheus) and traces (OpenTelemetry) of the delivery path, shared by every service."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import Counter, Gauge, Histogram

from common.kit.logging import get_logger

log = get_logger(__name__)

# --- metrics ------------------------------------------------------------------------------
# One set per process; the `service` label keeps in-process tests and the real processes
# apart. Names follow Prometheus conventions (unit suffixes, _total for counters).

DELIVERIES = Counter(
    "shop_deliveries_total", "Deliveries a subscriber finished, by outcome.",
    ["service", "queue", "event_type", "outcome"])
HANDLER_SECONDS = Histogram(
    "shop_handler_duration_seconds", "From a delivery's arrival to its commit (or failure).",
    ["service", "event_type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
CONFIRM_SECONDS = Histogram(
    "shop_publish_confirm_seconds", "From publish to the broker's confirm.",
    ["service", "event_type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
PUBLISH_FAILURES = Counter(
    "shop_publish_failures_total", "Publishes that were not confirmed (they are retried).",
    ["service", "event_type"])
OUTBOX_BACKLOG = Gauge(
    "shop_outbox_backlog", "Outbox rows committed but not yet confirmed by the broker.",
    ["service"])
OUTBOX_AGE = Gauge(
    "shop_outbox_oldest_age_seconds", "Age of the oldest unsent outbox row (0 when empty).",
    ["service"])
RECEIPT_LAG = Histogram(
    "shop_receipt_lag_seconds", "From an event's occurrence to the tracker reading a receipt "
    "about it.", ["subscriber", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


def start_metrics_server(host: str, port: int, service: str) -> WSGIServer | None:
    """Serve /metrics on `host`:`port` (port 0: not at all), from a thread prometheus-client
    owns. The server, to stop it with `shutdown()`, or None."""
    if port <= 0:
        return None
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host)
    log.info("metrics served", host=host, port=port, path="/metrics", service=service)
    return server


# --- traces -------------------------------------------------------------------------------
# The W3C trace context travels in message headers (`traceparent`, `tracestate`), so one
# order is one trace across every service. Spans follow OpenTelemetry's messaging semantic
# conventions. Without a configured SDK the API is a no-op and costs next to nothing.

tracer = trace.get_tracer("shop.kit")


def tracing_active() -> bool:
    """Whether an SDK records spans (configure_tracing, or a test's provider). Without one
    the kit skips its spans and passes the incoming trace context through unchanged, which
    is all a no-op span would have done, for less."""
    return not isinstance(trace.get_tracer_provider(),
                          trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def trace_headers_of(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """The W3C trace context among a message's headers."""
    return {k: str(v) for k, v in (headers or {}).items() if k in _TRACE_HEADERS}


_TRACE_HEADERS = ("traceparent", "tracestate")


def current_trace_headers() -> dict[str, str]:
    """The current trace context as message headers (empty when there is no active span)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from(headers: Mapping[str, Any] | None) -> otel_context.Context:
    return propagate.extract(trace_headers_of(headers))


def _messaging_attributes(operation: str, destination: str, message_id: str | None,
                          event_type: str | None, service: str) -> dict[str, str]:
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation,
        "messaging.destination.name": destination,
        "shop.service": service,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    if event_type:
        attributes["shop.event_type"] = event_type
    return attributes


@contextlib.contextmanager
def publish_span(destination: str, message_id: str, event_type: str, service: str,
                 parent: Mapping[str, Any] | None) -> Iterator[dict[str, str]]:
    """A PRODUCER span for one publish, child of the context stored with the event; yields
    the headers that carry this span to the consumer."""
    if not tracing_active():
        yield trace_headers_of(parent)
        return
    ctx = context_from(parent) if parent else None
    with tracer.start_as_current_span(
            f"send {destination}", context=ctx, kind=SpanKind.PRODUCER,
            attributes=_messaging_attributes("send", destination, message_id, event_type,
                                             service)) as span:
        try:
            yield current_trace_headers()
        except Exception as exc:
            _fail(span, exc)
            raise


@contextlib.contextmanager
def process_span(queue: str, message_id: str | None, event_type: str | None, service: str,
                 headers: Mapping[str, Any] | None) -> Iterator[Span]:
    """A CONSUMER span for handling one delivery, continuing the publisher's trace."""
    with tracer.start_as_current_span(
            f"process {queue}", context=context_from(headers), kind=SpanKind.CONSUMER,
            attributes=_messaging_attributes("process", queue, message_id, event_type,
                                             service)) as span:
        try:
            yield span
        except Exception as exc:
            _fail(span, exc)
            raise


def _fail(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))


def configure_tracing(service: str, exporter: str | None) -> None:
    """Install the SDK when an exporter is named (OTEL_TRACES_EXPORTER: otlp or console);
    off by default. The OTLP exporter reads the standard OTEL_EXPORTER_OTLP_* variables."""
    if not exporter or exporter == "none":
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: use otlp, console or none")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on", exporter=exporter)
