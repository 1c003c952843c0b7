"""Log lines name the delivery being handled, and only while it is handled."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import structlog

from common.kit import logging as shop_logging
from common.kit.logging import configure_logging, default_logging, delivery_context, get_logger
from common.kit.settings import ServiceSettings

pytestmark = pytest.mark.unit


def test_lines_inside_a_delivery_carry_its_ids_and_lines_after_it_do_not(
        capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(ServiceSettings(log_format="json", log_level="INFO"))
    log = get_logger("test")
    try:
        with delivery_context(event_id="e-1", order_id="o-1", correlation_id="o-1"):
            log.info("inside", order_id="explicit wins")
        log.info("outside")
        captured = capsys.readouterr()
        lines = [json.loads(line) for line in captured.err.splitlines() if line]
    finally:
        default_logging()
        logging.getLogger().handlers.clear()
    assert captured.out == ""
    inside, outside = lines[-2], lines[-1]
    assert inside["event"] == "inside"
    assert (inside["event_id"], inside["correlation_id"]) == ("e-1", "o-1")
    assert inside["order_id"] == "explicit wins"
    assert inside["service"] == ServiceSettings.service_name
    assert outside["event"] == "outside"
    assert "event_id" not in outside
    assert "order_id" not in outside


def _logged(level: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What reaches the log from a reconnect's worth of aiormq and aio-pika records, and
    from a warning of theirs that is not about reconnecting."""
    configure_logging(ServiceSettings(log_format="json", log_level=level))
    try:
        aiormq = logging.getLogger("aiormq.connection")
        aiormq.warning("Unexpected connection close from remote \"amqp://x\", "
                       "Connection.Close(reply_code=320)")
        aiormq.warning("Cancelling cause reader exited abnormally")
        aiormq.error("error when creating transport: <AMQPConnectionError: (111, ...)>")
        logging.getLogger("aio_pika.tools").error(
            "Callback <OneShotCallback: cb=<bound method RobustChannel._on_close of ...>> "
            "error: RuntimeError: closed")
        logging.getLogger("aio_pika.robust_connection").warning(
            "Connection attempt to \"amqp://x\" failed: refused. Reconnecting after 5 seconds.")
        logging.getLogger("aiormq.channel").warning("Channel closed with an unknown frame")
        get_logger("common.kit.broker").warning("broker connection lost; reconnecting")
        return [json.loads(line)["event"]
                for line in capsys.readouterr().err.splitlines() if line]
    finally:
        default_logging()
        logging.getLogger().handlers.clear()
        logging.getLogger().setLevel(logging.WARNING)


def test_the_amqp_clients_reconnect_noise_gives_way_to_our_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    """At INFO the client's tracebacks, callback errors and per-attempt warnings of a
    reconnect are dropped (the kit logs one line instead); its other warnings stay."""
    assert _logged("INFO", capsys) == ["Channel closed with an unknown frame",
                                       "broker connection lost; reconnecting"]


def test_at_debug_the_amqp_clients_reconnect_lines_are_all_kept(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert len(_logged("DEBUG", capsys)) == 7


def test_a_logger_used_before_logging_is_configured_writes_to_stderr(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Before `configure_logging` runs, or in a process that never runs it (a library
    user, a command that logs before its set-up), structlog's lines go to stderr: stdout is
    a command's result."""
    structlog.reset_defaults()  # as in a new process, before common.kit.logging is imported
    importlib.reload(shop_logging)
    structlog.get_logger("test").warning("before configuration")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "before configuration" in captured.err
