"""Catch-up's inputs and the history's retention, without a broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from common.events import OrderPlaced, StockReserved, SubscriberAnnounced
from common.kit.settings import ServiceSettings
from common.kit.topology import Topology
from common.ops.catchup_cli import parse_since

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-30T10:15:00Z", datetime(2026, 11, 30, 10, 15, tzinfo=UTC)),
    ("2026-11-30T11:15:00+01:00", datetime(2026, 11, 30, 10, 15, tzinfo=UTC)),
    ("2026-11-30T10:15", datetime(2026, 11, 30, 10, 15, tzinfo=UTC)),
    ("2026-11-29", datetime(2026, 11, 29, tzinfo=UTC)),
    ("90m", NOW - timedelta(minutes=90)),
    ("2h", NOW - timedelta(hours=2)),
    ("1.5d", NOW - timedelta(hours=36)),
    ("30s", NOW - timedelta(seconds=30)),
])
def test_since_is_a_time_utc_unless_it_says_or_a_duration_ago(text: str,
                                                              expected: datetime) -> None:
    """ISO 8601 with or without a zone (then UTC), or how long ago."""
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "-2h", "2w", ""])
def test_since_that_is_neither_says_what_it_takes(text: str) -> None:
    """A time the command cannot read is refused with the forms it accepts."""
    with pytest.raises(ValueError, match=r"neither a time .* nor a duration ago"):
        parse_since(text, NOW)


def test_the_history_is_bounded_as_the_settings_say() -> None:
    """SHOP_HISTORY_HOURS and SHOP_HISTORY_MAX_BYTES become the stream's x-max-age and
    x-max-length-bytes, with segments an eighth of the byte limit (the broker drops history
    a segment at a time)."""
    settings = ServiceSettings(history_hours=48, history_max_bytes=80_000_000, name_prefix="p.")
    topology = Topology.of(settings)
    assert topology.history is not None
    assert topology.history.arguments() == {
        "x-queue-type": "stream", "x-max-age": "172800s", "x-max-length-bytes": 80_000_000,
        "x-stream-max-segment-size-bytes": 10_000_000}
    assert topology.history_stream(OrderPlaced) == "p.order.placed.history"


def test_history_is_kept_of_business_events_only_and_can_be_turned_off() -> None:
    """Receipts and announcements have no history; SHOP_HISTORY=false keeps none at all."""
    topology = Topology.of(ServiceSettings())
    assert topology.keeps_history(OrderPlaced)
    assert topology.keeps_history(StockReserved)
    assert not topology.keeps_history(SubscriberAnnounced)
    assert not Topology.of(ServiceSettings(history=False)).keeps_history(OrderPlaced)
