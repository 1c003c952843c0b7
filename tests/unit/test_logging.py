"""Log lines name the delivery being handled, and only while it is handled."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from common.logging import configure_logging, delivery_context, get_logger
from common.settings import ServiceSettings

pytestmark = pytest.mark.unit


def test_lines_inside_a_delivery_carry_its_ids_and_lines_after_it_do_not(
        capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(ServiceSettings(log_format="json", log_level="INFO"))
    log = get_logger("test")
    try:
        with delivery_context(event_id="e-1", order_id="o-1", correlation_id="o-1"):
            log.info("inside", order_id="explicit wins")
        log.info("outside")
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    inside, outside = lines[-2], lines[-1]
    assert inside["event"] == "inside"
    assert (inside["event_id"], inside["correlation_id"]) == ("e-1", "o-1")
    assert inside["order_id"] == "explicit wins"
    assert inside["service"] == ServiceSettings.service_name
    assert outside["event"] == "outside"
    assert "event_id" not in outside
    assert "order_id" not in outside
