"""An order's fan-out: which subscribers handled its OrderPlaced, which failed, which are late."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ReceiptOutcome = Literal["handled", "duplicate", "retried", "dead_lettered", "replayed"]
SubscriberOutcome = Literal["handled", "failed", "retrying", "pending", "late"]

#: What a subscriber's latest unsuccessful receipt makes of it: a delivery waiting in a delay
#: queue is retrying; one sent back from the dead-letter queue is pending again.
_UNSUCCESSFUL: dict[str, SubscriberOutcome] = {
    "dead_lettered": "failed", "retried": "retrying", "replayed": "pending"}

#: A subscriber in one of these has given its final answer; any other status can turn late.
FINAL: frozenset[str] = frozenset({"handled", "failed"})


@dataclass(frozen=True)
class Receipt:
    """What one subscriber reported about one delivery of the order's `OrderPlaced`."""

    subscriber: str
    outcome: ReceiptOutcome
    at: datetime
    error: str | None = None
    duration_ms: float | None = None
    #: The queue the delivery came from; its dead-letter queue is this name + ".dlq".
    queue: str | None = None


class SubscriberStatus(BaseModel):
    """One subscriber's answer (or silence) about an order."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The subscribing service.", examples=["inventory"])
    expected: bool = Field(description="Registered for OrderPlaced when the order was placed.")
    status: SubscriberOutcome = Field(
        description="handled; failed (in its dead-letter queue); retrying (failed, waiting in a "
                    "delay queue); pending (no answer yet, or replayed from the DLQ); or late "
                    "(an expected subscriber with no final answer within the deadline, "
                    "ORDER_LATE_AFTER).")
    late: bool = Field(default=False,
                       description="No final answer (handled or failed) within the deadline.")
    outcome: ReceiptOutcome | None = Field(
        default=None, description="The receipt the status comes from, if any.")
    error: str | None = Field(default=None, description="Why it failed, when it did.")
    dead_letter_queue: str | None = Field(
        default=None, description="Where the failed delivery waits for an operator, when failed.",
        examples=["logistics.order.placed.dlq"])
    at: datetime | None = Field(default=None, description="When the delivery arrived.")
    duration_ms: float | None = Field(default=None, description="How long it took.")


class FanOut(BaseModel):
    """Did every subscriber handle the order's `OrderPlaced`?"""

    model_config = ConfigDict(frozen=True)

    subscribers: tuple[SubscriberStatus, ...]
    complete: bool = Field(description="Every expected subscriber gave its final answer; one "
                                       "that joined later (caught up) is shown, never waited "
                                       "for.")

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.subscribers if s.status == "pending")

    @property
    def unanswered(self) -> tuple[str, ...]:
        """Subscribers without a final answer yet: pending, retrying or late."""
        return tuple(s.name for s in self.subscribers if s.status not in FINAL)

    @property
    def late(self) -> bool:
        return any(s.late for s in self.subscribers)

    def count(self, status: SubscriberOutcome) -> int:
        return sum(1 for s in self.subscribers if s.status == status)


def _decisive(receipts: list[Receipt]) -> Receipt:
    """The receipt that says what a subscriber did.

    A success wins over a failure whatever their order: a dead-lettered delivery replayed
    later and handled is handled, and a redelivery of a handled event (duplicate) does not
    undo it. Among failures, the latest tells the current error.
    """
    successes = [r for r in receipts if r.outcome not in _UNSUCCESSFUL]
    pool = successes or receipts
    return max(pool, key=lambda r: r.at)


def is_late(since: datetime, now: datetime, late_after: timedelta) -> bool:
    """More than `late_after` has passed since `since` (the deadline is exclusive)."""
    return now - since > late_after


def fan_out(expected: Iterable[str], receipts: Iterable[Receipt], *,
            placed_at: datetime | None = None, now: datetime | None = None,
            late_after: timedelta | None = None) -> FanOut:
    """Per subscriber, handled / failed / retrying / pending / late, from the expected set
    and the receipts.

    Subscribers that answered without being expected (they announced themselves after the
    order was placed, but their queue got the event, or `shop catch-up` gave it to them)
    are listed too, marked unexpected; the order is complete without them.

    With `placed_at`, `now` and `late_after`, an expected subscriber without a final answer
    (handled or failed) more than `late_after` after the order was placed is late. An
    operator's replay from the dead-letter queue starts its clock again: the subscriber gets
    the same time to answer the replayed delivery.
    """
    expected_set = set(expected)
    by_subscriber: dict[str, list[Receipt]] = {}
    for receipt in receipts:
        by_subscriber.setdefault(receipt.subscriber, []).append(receipt)
    statuses: list[SubscriberStatus] = []
    for name in sorted(expected_set | by_subscriber.keys()):
        mine = by_subscriber.get(name, [])
        decisive = _decisive(mine) if mine else None
        status: SubscriberOutcome = ("pending" if decisive is None
                                     else _UNSUCCESSFUL.get(decisive.outcome, "handled"))
        late = False
        if (placed_at is not None and now is not None and late_after is not None
                and name in expected_set and status not in FINAL):
            replays = [r.at for r in mine if r.outcome == "replayed"]
            late = is_late(max([placed_at, *replays]), now, late_after)
        dlq = (f"{decisive.queue}.dlq" if decisive is not None and status == "failed"
               and decisive.queue else None)
        statuses.append(SubscriberStatus(
            name=name,
            expected=name in expected_set,
            status="late" if late else status,
            late=late,
            outcome=decisive.outcome if decisive else None,
            error=decisive.error if decisive else None,
            dead_letter_queue=dlq,
            at=decisive.at if decisive else None,
            duration_ms=decisive.duration_ms if decisive else None,
        ))
    return FanOut(subscribers=tuple(statuses),
                  complete=all(s.status in FINAL for s in statuses if s.expected))
