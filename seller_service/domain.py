"""The seller service's rule: each seller sees only its own lines of an order."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from common.events import OrderLine


@dataclass(frozen=True)
class SellerLines:
    """One seller's share of an order."""

    seller_id: str
    lines: tuple[OrderLine, ...]

    @property
    def total(self) -> Decimal:
        """What this seller's lines come to, in the order's currency."""
        return sum((line.line_total for line in self.lines), Decimal(0))


def group_by_seller(lines: Iterable[OrderLine]) -> list[SellerLines]:
    """The order's lines grouped per seller.

    Sellers come in the order they first appear and each keeps its lines' order, so the
    same order always gives the same notifications in the same order.
    """
    groups: dict[str, list[OrderLine]] = {}
    for line in lines:
        groups.setdefault(line.seller_id, []).append(line)
    return [SellerLines(seller_id=seller, lines=tuple(group)) for seller, group in groups.items()]
