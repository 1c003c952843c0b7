"""What each service's broker user may do: its own queues, its own events, nothing else."""

from __future__ import annotations

import re

import pytest

from common.kit.topology import Topology
from common.ops.access import Grant, grant_for
from inventory_service.service import service as inventory
from order_service.service import service as order
from seller_service.service import service as seller

pytestmark = pytest.mark.unit

PREFIX = "acme."
TOPOLOGY = Topology(PREFIX, retry_delays=(1.0, 10.0, 0.5))
INVENTORY, ORDER, SELLER = inventory.spec(), order.spec(), seller.spec()


def allows(pattern: str, name: str) -> bool:
    # RabbitMQ matches the whole name against the pattern (PCRE); these patterns use only
    # what Python's re reads the same way.
    return re.fullmatch(pattern, name) is not None


def grant(spec: object, **kwargs: bool) -> Grant:
    return grant_for(spec, TOPOLOGY, **kwargs)  # type: ignore[arg-type]


def test_a_subscriber_writes_only_its_own_events_the_audit_and_its_own_dead_letter_paths() -> None:
    """Inventory may publish its outcomes, receipts and its own retries and dead letters;
    not OrderPlaced, another service's outcome, another queue's paths or the default exchange
    (which reaches every queue)."""
    write = grant(INVENTORY).write
    for name in ("acme.stock.reserved", "acme.stock.reservation_failed", "acme.audit",
                 "acme.inventory.order.placed.dlx"):
        assert allows(write, name), name
    for name in ("acme.order.placed", "acme.shipment.scheduled", "acme.seller.notified",
                 "acme.seller.order.placed.dlx", "acme.audit.tracker.dlx", "amq.default", "",
                 "stock.reserved", "acme.stock.reservedX", "acmeXstock.reserved"):
        assert not allows(write, name), name


def test_a_subscriber_reads_only_its_own_queues() -> None:
    """Seller consumes its queue (and binds from OrderPlaced's exchange and its own
    dead-letter exchange); never another's queue, nor its own dead letters (an operator's)."""
    read = grant(SELLER).read
    for name in ("acme.seller.order.placed", "acme.order.placed", "acme.seller.order.placed.dlx"):
        assert allows(read, name), name
    for name in ("acme.inventory.order.placed", "acme.audit.tracker", "acme.audit",
                 "acme.stock.reserved", "acme.seller.order.placed.dlq"):
        assert not allows(read, name), name


def test_a_subscriber_declares_its_queues_with_their_delay_and_dead_letter_queues() -> None:
    """Configure covers the queue, its delay queues whatever their delays, its dead-letter
    queue and exchange, and the exchanges it uses; not another service's queues."""
    configure = grant(INVENTORY).configure
    queue = TOPOLOGY.queue("inventory", next(iter(INVENTORY.handlers)))
    for name in [*TOPOLOGY.service_queues(queue), TOPOLOGY.dead_letter_exchange(queue),
                 "acme.order.placed", "acme.stock.reserved", "acme.audit"]:
        assert allows(configure, name), name
    for name in ("acme.logistics.order.placed", "acme.audit.tracker", "acme.shipment.scheduled"):
        assert not allows(configure, name), name


def test_the_tracker_owns_the_audit_queue_and_observes_the_broker() -> None:
    """The order service consumes the audit queue and the outcomes, publishes OrderPlaced,
    and reads the management API (monitoring)."""
    order = grant(ORDER, observer=True)
    assert allows(order.read, "acme.audit.tracker")
    assert allows(order.read, "acme.order.stock.reserved")
    assert allows(order.write, "acme.order.placed")
    assert not allows(order.write, "acme.stock.reserved")
    assert order.tags == ("monitoring",)
    assert grant(INVENTORY).tags == ()


def test_names_are_matched_literally() -> None:
    """A prefix with regex characters cannot widen a grant."""
    wide = grant_for(INVENTORY, Topology("a.b+c|"))
    assert allows(wide.write, "a.b+c|stock.reserved")
    assert not allows(wide.write, "aXb+c|stock.reserved")
    assert not allows(wide.write, "stock.reserved")
    assert wide.user == "a.b+c|inventory"


def test_a_producer_declares_and_binds_the_history_of_its_own_events_only() -> None:
    """Inventory may declare the streams of StockReserved and StockReservationFailed and
    bind them to their exchanges (write on the stream, read on the exchange); not the history
    of OrderPlaced or of another service's outcome, and it may consume none of them."""
    inventory = grant(INVENTORY)
    for name in ("acme.stock.reserved.history", "acme.stock.reservation_failed.history"):
        assert allows(inventory.configure, name), name
        assert allows(inventory.write, name), name
        assert not allows(inventory.read, name), name
    assert allows(inventory.read, "acme.stock.reserved")
    for name in ("acme.order.placed.history", "acme.shipment.scheduled.history",
                 "acme.audit.history"):
        assert not allows(inventory.configure, name), name
        assert not allows(inventory.write, name), name
    order = grant(ORDER)
    assert allows(order.configure, "acme.order.placed.history")
    assert not allows(order.configure, "acme.stock.reserved.history")
