"""structlog set-up, once per process: JSON when not on a terminal, readable colours on one."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog

from common.kit.settings import ServiceSettings


def _print_to_stderr(*_args: Any) -> structlog.PrintLogger:
    # sys.stderr looked up per logger, so a replaced stream (a test's capture) is honoured.
    return structlog.PrintLogger(sys.stderr)


def default_logging() -> None:
    """structlog's defaults, except that its lines go to stderr: how a logger behaves before
    `configure_logging` runs, or in a process that never runs it. structlog prints to stdout
    out of the box, and a command's stdout is its result."""
    structlog.reset_defaults()
    structlog.configure(logger_factory=_print_to_stderr)


if not structlog.is_configured():
    default_logging()


def configure_logging(settings: ServiceSettings, *, name: str | None = None) -> None:
    """Route structlog and the standard library (aio-pika, uvicorn) through one renderer,
    on stderr. Each line names the service (`name`, by default the settings' service)."""
    level = settings.log_level.upper()
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _merge_delivery,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(),
            # Rich's boxed tracebacks with locals help at a terminal, drown a log file.
            exception_formatter=(structlog.dev.rich_traceback if sys.stderr.isatty()
                                 else structlog.dev.plain_traceback))
    )
    structlog.configure(
        # Level first: a debug line on the hot path costs a level check, not a rendering.
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    if logging.getLevelName(level) != logging.DEBUG:
        handler.addFilter(ReconnectNoise())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info if fmt == "json" else _noop,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    structlog.contextvars.bind_contextvars(service=name or settings.service_name)
    # Their INFO lines are per channel, per frame or per HTTP request (httpx: the CLI's
    # calls to the order API, a service's to the management API); what matters reaches
    # WARNING.
    for library in ("aiormq", "aio_pika", "httpx"):
        logging.getLogger(library).setLevel(max(logging.WARNING, root.level))


#: What aiormq and aio-pika log while a robust connection is down and coming back: a
#: traceback for the closed socket, errors from the callbacks of the channels it closed, a
#: warning per reconnect attempt. `common.kit.broker.connect` says instead, once, that the
#: connection was lost and when it is back.
_RECONNECT_NOISE = (
    "Unexpected connection close from remote",
    "Cancelling cause reader exited abnormally",
    "error when creating transport",
    "Connection attempt to ",
    "Reconnect attempt failed",
    "RobustChannel._on_close",
)


class ReconnectNoise(logging.Filter):
    """Drops the AMQP client's reconnect noise (kept at DEBUG, where this is not used)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("aiormq", "aio_pika")):
            return True
        message = record.getMessage()
        return not any(pattern in message for pattern in _RECONNECT_NOISE)


def _noop(_logger: Any, _name: str, event_dict: Any) -> Any:
    return event_dict


#: The delivery being handled (event_id, event_type, correlation_id, order_id): one context
#: variable set per delivery, where binding each key with structlog's would cost several.
_delivery: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "shop_delivery", default=None)


@contextlib.contextmanager
def delivery_context(**fields: Any) -> Iterator[None]:
    """Every log line inside names the delivery (its event, flow and order)."""
    token = _delivery.set(fields)
    try:
        yield
    finally:
        _delivery.reset(token)


def _merge_delivery(_logger: Any, _name: str, event_dict: Any) -> Any:
    fields = _delivery.get()
    if fields:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
    return event_dict


def get_logger(name: str) -> Any:
    """A structlog logger; delivery context (event_id, order_id, ...) is bound by the runner."""
    return structlog.get_logger(name)
