"""Logistics' rules: which carrier ships where, how long it takes, how a parcel is tracked."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import date, timedelta

#: A fixed namespace for shipment ids: uuid5(namespace, order id) gives the same shipment
#: for the same order on every replay, in every replica.
SHIPMENT_NAMESPACE = uuid.UUID("6b1f4a52-0c8e-5d43-9b6e-2a7c1e5f8d90")


@dataclass(frozen=True)
class Carrier:
    """A carrier we ship with."""

    name: str
    #: Business days from the order to the door.
    transit_days: int
    #: Starts every tracking number, so support can tell the carrier at a glance.
    tracking_prefix: str


DHL = Carrier("DHL", transit_days=2, tracking_prefix="DHL")
COLISSIMO = Carrier("Colissimo", transit_days=3, tracking_prefix="COL")
ROYAL_MAIL = Carrier("Royal Mail", transit_days=4, tracking_prefix="RM")
UPS = Carrier("UPS", transit_days=5, tracking_prefix="1Z")
DHL_EXPRESS = Carrier("DHL Express", transit_days=6, tracking_prefix="DHX")

#: Destination country (ISO 3166-1 alpha-2) -> carrier; anywhere else goes DHL_EXPRESS.
CARRIERS_BY_COUNTRY: dict[str, Carrier] = {
    "DE": DHL,
    "AT": DHL,
    "FR": COLISSIMO,
    "GB": ROYAL_MAIL,
    "US": UPS,
    "CA": UPS,
}
DEFAULT_CARRIER = DHL_EXPRESS


@dataclass(frozen=True)
class Shipment:
    """A scheduled shipment of one order."""

    shipment_id: uuid.UUID
    order_id: uuid.UUID
    carrier: str
    tracking_number: str
    destination_country: str
    estimated_delivery: date


def carrier_for(country: str) -> Carrier:
    """The carrier for a destination country."""
    return CARRIERS_BY_COUNTRY.get(country.upper(), DEFAULT_CARRIER)


def add_business_days(start: date, days: int) -> date:
    """`days` working days after `start`, Saturdays and Sundays not counted.

    An order placed on a Friday (or at the weekend) with one day of transit arrives on Monday.
    """
    if days < 0:
        raise ValueError("days must be >= 0")
    current = start
    remaining = days
    while remaining:
        current += timedelta(days=1)
        if current.weekday() < 5:  # Monday..Friday
            remaining -= 1
    return current


def tracking_number(order_id: uuid.UUID, carrier: Carrier) -> str:
    """A tracking number derived from the order and carrier: a replay gets the same one."""
    digest = hashlib.sha256(f"{carrier.name}:{order_id}".encode()).hexdigest()
    return f"{carrier.tracking_prefix}-{digest[:12].upper()}"


def shipment_id(order_id: uuid.UUID) -> uuid.UUID:
    """The shipment's id, derived from the order's (one shipment per order)."""
    return uuid.uuid5(SHIPMENT_NAMESPACE, str(order_id))


def plan_shipment(order_id: uuid.UUID, country: str, placed_on: date) -> Shipment:
    """The shipment for an order placed on `placed_on` to `country`.

    Every field follows from the inputs, so handling the same OrderPlaced twice plans the
    same shipment.
    """
    carrier = carrier_for(country)
    return Shipment(
        shipment_id=shipment_id(order_id),
        order_id=order_id,
        carrier=carrier.name,
        tracking_number=tracking_number(order_id, carrier),
        destination_country=country.upper(),
        estimated_delivery=add_business_days(placed_on, carrier.transit_days),
    )
