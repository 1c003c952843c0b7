"""Inventory's rule: reserve every line of an order, or none of them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.events import OrderLine, ReservedLine, UnreservableLine


@dataclass(frozen=True)
class Reservation:
    """The decision for one order: what to reserve, or why nothing can be."""

    #: Quantities to reserve, one per SKU (lines of the same SKU added up); empty on failure.
    reserved: tuple[ReservedLine, ...]
    #: The SKUs that cannot be reserved; empty when the whole order can be.
    unreservable: tuple[UnreservableLine, ...]

    @property
    def ok(self) -> bool:
        return not self.unreservable

    @property
    def summary(self) -> str:
        """One sentence for people (the `reason` of StockReservationFailed)."""
        if self.ok:
            return "reserved " + ", ".join(f"{ln.quantity} x {ln.sku}" for ln in self.reserved)
        parts = []
        for line in self.unreservable:
            if line.reason == "unknown_sku":
                parts.append(f"unknown SKU {line.sku}")
            else:
                parts.append(f"not enough stock for {line.sku} "
                             f"(requested {line.requested}, available {line.available})")
        return "; ".join(parts)


def requested_quantities(lines: Iterable[OrderLine]) -> dict[str, int]:
    """Units asked for per SKU, in the order the SKUs first appear.

    The same SKU on two lines (two sellers, say) draws on one stock, so it counts together:
    checking each line alone would let 2 lines of 3 pass against a stock of 4.
    """
    wanted: dict[str, int] = {}
    for line in lines:
        wanted[line.sku] = wanted.get(line.sku, 0) + line.quantity
    return wanted


def plan_reservation(lines: Iterable[OrderLine], stock_levels: Mapping[str, int]) -> Reservation:
    """Decide all-or-nothing: every SKU available in full, or report each one that is not.

    `stock_levels` maps a SKU to the units available for new orders; a SKU missing from it
    is not in the catalogue.
    """
    wanted = requested_quantities(lines)
    failed: list[UnreservableLine] = []
    for sku, quantity in wanted.items():
        if sku not in stock_levels:
            failed.append(UnreservableLine(sku=sku, requested=quantity, available=0,
                                           reason="unknown_sku"))
        elif stock_levels[sku] < quantity:
            failed.append(UnreservableLine(sku=sku, requested=quantity,
                                           available=max(stock_levels[sku], 0),
                                           reason="insufficient_stock"))
    if failed:
        return Reservation(reserved=(), unreservable=tuple(failed))
    reserved = tuple(ReservedLine(sku=sku, quantity=qty) for sku, qty in wanted.items())
    return Reservation(reserved=reserved, unreservable=())
