"""`/orders`: place an order, read its status and its timeline, list orders a page at a time."""

from __future__ import annotations

import base64
import struct
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Header, HTTPException, Query, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from common.events import Event, OrderPlaced
from common.kit.telemetry import tracer
from order_service.api.dependencies import LateAfter, OrderRuntime, Running
from order_service.api.errors import Problem
from order_service.domain.order import NewOrder, OrderState, place_order, same_order
from order_service.domain.timeline import OrderTrace
from order_service.domain.views import OrderStatus, OrderSummary, OrderView
from order_service.store import OrderStore
from order_service.store.status import Position
from order_service.tracker import settle_answered

router = APIRouter()

#: A client's key for one order: the same key again is a retry of that order, not a new one.
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=128,
    description="Any string unique per order of a customer (a UUID, say); a request sent "
                "again with it places the order once.")]


class OrderAccepted(BaseModel):
    """The answer to `POST /orders`: the order is stored and its event is on its way."""

    model_config = ConfigDict(frozen=True)

    order_id: uuid.UUID = Field(description="The new order's id.")
    status_url: str = Field(description="Where to read the order's status.",
                            examples=["/orders/5b0c7f9e-3f7a-4e34-9a57-0d8c1c6b2f10"])
    state: OrderState = Field(description="The order's state now: accepted (a replay under "
                                          "an Idempotency-Key: wherever the order is now).")
    publication: str = Field(
        description="Where its OrderPlaced is: always pending publication from the outbox "
                    "at this point; the status URL shows when subscribers answer.",
        examples=["pending: published as soon as the broker confirms it"])
    order: OrderView = Field(description="The order as stored.")


#: The most orders one `GET /orders` answers. Each order's fan-out is worked out on the event
#: loop (SQLite runs inline): a bounded page keeps one client from holding up every other,
#: and the cursor makes a deep page as cheap as the first.
PAGE_MAX = 200
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR_LENGTH = 32  # 8 bytes of time and 16 of order id, in base64url without padding


def encode_cursor(position: Position) -> str:
    """An opaque cursor for the page after `position`."""
    micros = (position.placed_at - _EPOCH) // timedelta(microseconds=1)
    raw = struct.pack(">q", micros) + position.order_id.bytes
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position a cursor of `encode_cursor` stands for; ValueError for anything else."""
    try:
        if len(cursor) != _CURSOR_LENGTH:
            raise ValueError(cursor)
        raw = base64.urlsafe_b64decode(cursor.encode("ascii") + b"====")
        (micros,) = struct.unpack(">q", raw[:8])
        return Position(_EPOCH + timedelta(microseconds=micros), uuid.UUID(bytes=raw[8:]))
    except (ValueError, struct.error, OverflowError):
        raise ValueError("not a cursor this API gave out: take it from the Link header of "
                         "the previous page") from None


def _checked_cursor(cursor: str | None) -> str | None:
    if cursor is not None:
        decode_cursor(cursor)
    return cursor


Cursor = Annotated[str | None, Query(
    max_length=64, description="Where the page starts: the cursor in the previous page's "
                               "`Link` header; the first page without it."),
    AfterValidator(_checked_cursor)]

_UNKNOWN_ORDER: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "Unknown order."}}


@router.post("/orders", status_code=202, response_model=OrderAccepted,
             responses={400: {"model": Problem, "description":
                                  "The body is not JSON (malformed, not UTF-8, nested too "
                                  "deeply), or its Content-Length is invalid."},
                        413: {"model": Problem, "description": "Body too large."},
                        415: {"model": Problem, "description": "Not sent as JSON."},
                        409: {"model": Problem, "description": "Idempotency-Key already "
                                                               "used for another order."}},
             summary="Place an order")
async def post_order(order: NewOrder, response: Response, rt: Running,
                     idempotency_key: IdempotencyKey = None) -> OrderAccepted:
    """Validate and store the order; its `OrderPlaced` is published from the outbox.

    With an `Idempotency-Key`, sending the same order again (a retry after a lost
    answer) places it once: the answer is the first one's, marked `Idempotent-Replayed:
    true`. The key is the customer's: another order of theirs with it is refused (409).
    """
    event = place_order(order)
    # The order's trace starts here; the outbox keeps its context for the publish.
    with tracer.start_as_current_span("place order", attributes={
            "shop.service": "order", "shop.order_id": str(event.order_id)}):
        earlier = await _store_once(rt, event, idempotency_key)
    state = OrderState.ACCEPTED
    if earlier is not None:
        stored, state = earlier
        if not same_order(stored, event):
            raise HTTPException(409, f"Idempotency-Key {idempotency_key!r} was used for "
                                     f"order {stored.order_id}, which differs from this "
                                     "one; use a new key for a new order")
        event = stored
        response.headers["Idempotent-Replayed"] = "true"
    status_url = f"/orders/{event.order_id}"
    response.headers["Location"] = status_url
    publication = ("pending: published as soon as the broker confirms it"
                   if rt.broker_ok() else
                   "pending: the broker is unreachable; the order is kept and published "
                   "when it returns")
    return OrderAccepted(order_id=event.order_id, status_url=status_url,
                         state=state, publication=publication, order=OrderView.of(event))


async def _store_once(rt: OrderRuntime, event: OrderPlaced, key: str | None
                      ) -> tuple[OrderPlaced, OrderState] | None:
    """Store the order, unless its customer placed one with this Idempotency-Key already:
    that one then, with its state; None when this order was stored."""
    if key is not None:
        earlier = await _order_for_key(rt, event.customer_id, key)
        if earlier is not None:
            return earlier

    async def add(conn: AsyncConnection) -> list[Event]:
        await OrderStore(conn).add_order(event, key)
        return [event]

    try:
        await rt.execute(add)
    except IntegrityError:
        # Another request stored an order with this key between our read and our write.
        earlier = await _order_for_key(rt, event.customer_id, key) if key is not None else None
        if earlier is None:
            raise
        return earlier
    return None


async def _order_for_key(rt: OrderRuntime, customer_id: str, key: str
                         ) -> tuple[OrderPlaced, OrderState] | None:
    async with rt.engine.connect() as conn:
        return await OrderStore(conn).order_for_key(customer_id, key)


@router.get("/orders/{order_id}", response_model=OrderStatus, responses=_UNKNOWN_ORDER,
            summary="An order's status")
async def get_order(order_id: uuid.UUID, rt: Running, late_after: LateAfter) -> OrderStatus:
    """The order, its state, each subscriber's answer and the domain outcomes.

    An expected subscriber without a final answer `ORDER_LATE_AFTER` seconds after the
    order was placed is late.
    """
    async with rt.engine.connect() as conn:
        status = await OrderStore(conn).status(order_id, now=datetime.now(UTC),
                                               late_after=late_after)
    if status is None:
        raise HTTPException(404, f"order {order_id} not found")
    return status


@router.get("/orders/{order_id}/trace", response_model=OrderTrace, responses=_UNKNOWN_ORDER,
            summary="An order's timeline")
async def trace_order(order_id: uuid.UUID, rt: Running) -> OrderTrace:
    """Placed, published, every receipt of its flow and every outcome, in time order."""
    async with rt.engine.connect() as conn:
        found = await OrderStore(conn).trace(order_id)
    if found is None:
        raise HTTPException(404, f"order {order_id} not found")
    return found


@router.get("/orders", response_model=list[OrderSummary], summary="The latest orders",
            responses={200: {"headers": {"Link": {
                "description": 'Where the next page is, when there is one: '
                               '`</orders?limit=50&cursor=...>; rel="next"`.',
                "schema": {"type": "string"}}}}})
async def list_orders(
    response: Response,
    rt: Running,
    late_after: LateAfter,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="How many, newest "
                                                               "first.")] = 50,
    cursor: Cursor = None,
    late: Annotated[bool, Query(description="Only orders with a late subscriber.")] = False,
) -> list[OrderSummary]:
    """The latest orders, newest first, with their fan-out counts and each subscriber's
    status, a page at a time: when there are more, the `Link` header (`rel="next"`)
    gives the next page's address."""
    after = decode_cursor(cursor) if cursor is not None else None
    now = datetime.now(UTC)
    if late:
        await settle_answered(rt.commits, now, now - late_after)
    async with rt.engine.connect() as conn:
        store = OrderStore(conn)
        # One more than asked for tells whether a next page exists.
        if late:
            found = await store.late_orders(now, late_after, limit=limit + 1, after=after)
        else:
            found = await store.list_orders(limit + 1, after=after, now=now,
                                            late_after=late_after)
    if len(found) > limit:
        found = found[:limit]
        query = {"limit": limit, "cursor": encode_cursor(Position.of(found[-1])),
                 **({"late": "true"} if late else {})}
        response.headers["Link"] = f'</orders?{urlencode(query)}>; rel="next"'
    return found
