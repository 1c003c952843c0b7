"""The order service's HTTP API: place an order, read its fan-out status, check health."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Generic, Protocol, TypeVar
from urllib.parse import urlencode

import uvicorn
from aio_pika.abc import AbstractConnection
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.contracts import asyncapi
from common.events import Event, OrderPlaced
from common.kit import discovery
from common.kit.declare import Service
from common.kit.logging import get_logger
from common.kit.settings import ServiceSettings
from common.kit.telemetry import tracer
from common.kit.topology import Topology
from common.ops.observe import event_exchanges, read_broker
from common.ops.system_report import Announced, SystemReport, compare
from order_service.access import PROBE, ApiToken, HostCheck, declare_api_token, operator_only
from order_service.domain.order import NewOrder, OrderState, place_order, same_order
from order_service.domain.timeline import OrderTrace
from order_service.domain.views import OrderStatus, OrderSummary, OrderView, Subscriber
from order_service.http_server import Server, server_config
from order_service.settings import OrderSettings
from order_service.store import OrderStore
from order_service.store.status import Position
from order_service.webpage import index_page

Work = Callable[[AsyncConnection], Awaitable[Sequence[Event]]]

log = get_logger(__name__)
T = TypeVar("T")


class OrderRuntime(Protocol):
    """What the API needs from the running service (`common.kit.runner.Runtime` has it).

    A protocol rather than the concrete class keeps the API testable without a broker.
    """

    @property
    def settings(self) -> ServiceSettings: ...

    @property
    def engine(self) -> AsyncEngine: ...

    async def execute(self, work: Work) -> list[Event]:
        """One transaction: run `work`, put the events it returns in the outbox, commit."""
        ...

    def broker_ok(self) -> bool: ...

    async def db_ok(self) -> bool: ...


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


class Health(BaseModel):
    """`GET /healthz`: ok only when both the broker and the database answer."""

    status: str = Field(examples=["ok", "unavailable"])
    broker: bool
    database: bool


class Problem(BaseModel):
    """An error answer."""

    detail: str


#: The most orders one `GET /orders` answers. Each order's fan-out is worked out on the event
#: loop (SQLite runs inline), about 3 ms per 50 orders: a bounded page keeps one client from
#: holding up every other, and the cursor makes a deep page as cheap as the first.
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


class Recent(Generic[T]):
    """The last answer of an expensive read, reused for `ttl` seconds.

    However many pages poll `GET /system`, the broker and the late orders are read at most
    once per `ttl`; callers arriving meanwhile wait for the read in progress.
    """

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._lock = asyncio.Lock()
        self._value: T | None = None
        self._at = 0.0

    async def get(self, read: Callable[[], Awaitable[T]]) -> T:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at >= self.ttl:
                self._value = await read()
                self._at = time.monotonic()
            return self._value


class BodyLimit:
    """Refuse request bodies larger than `max_bytes` with 413, before anything parses them.

    Content-Length is checked first; a body sent without one (chunked) is counted as it
    arrives, so a client cannot get round the limit by leaving the header out.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.isdigit():
                await self._refuse(scope, receive, send, 400, "invalid Content-Length header")
                return
            if int(length) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._refuse(scope, receive, send, 413,
                           f"request body too large: the limit is {self.max_bytes} bytes")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int,
                      detail: str) -> None:
        response = JSONResponse({"detail": detail}, status_code=status,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


#: How deep the 422's echo of the input goes; deeper containers are cut (a nested body can
#: be as deep as the JSON decoder allows, and the answer must not be the one that fails).
ECHO_DEPTH = 8


def json_safe(value: Any, depth: int = ECHO_DEPTH) -> Any:
    """`value` as JSON can carry it, whatever a client sent: NaN and infinities as the tokens
    the client wrote, text UTF-8 cannot encode (lone surrogates) and bytes with backslash
    escapes, any other object as its text."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else json.dumps(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict | list | tuple) and depth <= 0:
        return "..."
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, depth - 1) for v in value]
    return json_safe(str(value))


def _not_json(why: str) -> JSONResponse:
    return JSONResponse({"detail": f"the body is not valid JSON: {why}"}, status_code=400)


async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    """A request FastAPI could not validate: 400 when its body is not JSON at all, 415 when it
    was not sent as JSON, else 422 with an error per field (the input echoed safely)."""
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid" and isinstance(exc.body, str):
            # A syntax error has no field to name: it is the request that is malformed.
            position = int(error["loc"][-1])
            line = exc.body.count("\n", 0, position) + 1
            column = position - exc.body.rfind("\n", 0, position)
            return _not_json(f"{error.get('ctx', {}).get('error')} at line {line}, "
                             f"column {column}")
    if isinstance(exc.body, bytes):
        # FastAPI reads a body as JSON only when its Content-Type says so.
        sent = request.headers.get("content-type")
        said = f"this request's is {sent!r}" if sent else "this request had none"
        return JSONResponse({"detail": "send the body as JSON, with Content-Type: "
                                       f"application/json ({said})"}, status_code=415)
    return JSONResponse({"detail": json_safe(errors)}, status_code=422)


async def http_problem(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's answer to an HTTPException, with two things put right: a 405's `Allow`
    names every method of the path (not only those of the first route on it), and a body
    FastAPI could not decode says why.

    OPTIONS gets that 405 too, rather than a 204: the API serves no CORS, so all an OPTIONS
    answer could say is what `Allow` says, and every method it answers stays a route of its
    own, with whatever checks the routes have.
    """
    if exc.status_code == 405:
        allowed = {method for route in request.app.router.routes if isinstance(route, Route)
                   and route.matches(request.scope)[0] is not Match.NONE
                   for method in route.methods or ()}
        exc = StarletteHTTPException(405, exc.detail, headers={
            **(exc.headers or {}), "Allow": ", ".join(sorted(allowed))})
    elif exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        cause = exc.__cause__
        return _not_json(f"it is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at "
                         f"offset {cause.start})")
    elif exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
        return _not_json("it is nested too deeply")
    return await http_exception_handler(request, exc)


class _Api(FastAPI):
    """FastAPI, with the API token declared in the OpenAPI document when one guards it."""

    #: When a token guards the API: the paths open without it.
    open_paths: frozenset[str] | None = None

    def openapi(self) -> dict[str, Any]:
        fresh = self.openapi_schema is None
        schema = super().openapi()
        if fresh and self.open_paths is not None:
            declare_api_token(schema, self.open_paths)
        return schema


async def settle_answered(rt: OrderRuntime, now: datetime, cutoff: datetime) -> None:
    """Mark settled the orders answered since the last look (`OrderStore.settle_answered`),
    a chunk per transaction, so the late-orders scan that follows reads only the rest."""
    after: datetime | None = None
    while True:
        start = after
        found: list[datetime | None] = []

        async def work(conn: AsyncConnection, start: datetime | None = start,
                       found: list[datetime | None] = found) -> list[Event]:
            # Run again if its group commit fails: it must not advance `after` itself.
            found[:] = [await OrderStore(conn).settle_answered(now, cutoff, after=start)]
            return []

        await rt.execute(work)
        if (after := found[0]) is None:
            return


def create_app(runtime: OrderRuntime | None, settings: OrderSettings) -> FastAPI:
    """The API over a running service; with `runtime=None` only the docs work (503 else)."""
    app = _Api(
        title="Order service",
        version="1.0",
        description="Place orders and follow their fan-out: which subscribers handled each "
                    "order's OrderPlaced, which failed and why, and the domain outcomes.",
    )
    open_paths = {"/", PROBE, *(path for path in (app.docs_url, app.redoc_url, app.openapi_url,
                                                  app.swagger_ui_oauth2_redirect_url) if path)}
    if settings.api_token is not None:
        app.open_paths = frozenset(open_paths)
    # The last added runs first: the Host, then the token, before a body is read.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.exception_handler(RequestValidationError)(invalid_request)
    app.exception_handler(StarletteHTTPException)(http_problem)
    app.add_middleware(ApiToken, api=settings.api_token, operator=settings.operator_token,
                       open_paths=open_paths)
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts)
    operator = operator_only(operator=settings.operator_token, api=settings.api_token)

    late_after = timedelta(seconds=settings.late_after)
    recent: Recent[SystemReport] = Recent()

    def need() -> OrderRuntime:
        if runtime is None:
            raise HTTPException(503, "the order service is not running")
        return runtime

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        """The live page: recent orders, a light per subscriber, queues, problems."""
        return index_page()

    @app.post("/orders", status_code=202, response_model=OrderAccepted,
              responses={400: {"model": Problem, "description":
                                   "The body is not JSON (malformed, not UTF-8, nested too "
                                   "deeply), or its Content-Length is invalid."},
                         413: {"model": Problem, "description": "Body too large."},
                         415: {"model": Problem, "description": "Not sent as JSON."},
                         409: {"model": Problem, "description": "Idempotency-Key already "
                                                                "used for another order."}},
              summary="Place an order")
    async def post_order(order: NewOrder, response: Response,
                         idempotency_key: IdempotencyKey = None) -> OrderAccepted:
        """Validate and store the order; its `OrderPlaced` is published from the outbox.

        With an `Idempotency-Key`, sending the same order again (a retry after a lost
        answer) places it once: the answer is the first one's, marked `Idempotent-Replayed:
        true`. The key is the customer's: another order of theirs with it is refused (409).
        """
        rt = need()
        event = place_order(order)
        earlier: list[tuple[OrderPlaced, OrderState]] = []

        async def work(conn: AsyncConnection) -> list[Event]:
            earlier.clear()  # run again if the group commit it shared failed
            store = OrderStore(conn)
            if idempotency_key is not None:
                found = await store.order_for_key(event.customer_id, idempotency_key)
                if found is not None:
                    earlier.append(found)
                    return []
            await store.add_order(event, idempotency_key)
            return [event]

        # The order's trace starts here; the outbox keeps its context for the publish.
        with tracer.start_as_current_span("place order", attributes={
                "shop.service": "order", "shop.order_id": str(event.order_id)}):
            try:
                await rt.execute(work)
            except IntegrityError:
                # Another replica stored an order with this key between our read and write.
                if idempotency_key is None:
                    raise
                async with rt.engine.connect() as conn:
                    found = await OrderStore(conn).order_for_key(event.customer_id,
                                                                 idempotency_key)
                if found is None:
                    raise
                earlier.append(found)
        state = OrderState.ACCEPTED
        if earlier:
            stored, state = earlier[0]
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
                             state=state, publication=publication,
                             order=OrderView.of(event))

    @app.get("/orders/{order_id}", response_model=OrderStatus,
             responses={404: {"model": Problem, "description": "Unknown order."}},
             summary="An order's status")
    async def get_order(order_id: uuid.UUID) -> OrderStatus:
        """The order, its state, each subscriber's answer and the domain outcomes.

        An expected subscriber without a final answer `ORDER_LATE_AFTER` seconds after the
        order was placed is late.
        """
        async with need().engine.connect() as conn:
            status = await OrderStore(conn).status(order_id, now=datetime.now(UTC),
                                                   late_after=late_after)
        if status is None:
            raise HTTPException(404, f"order {order_id} not found")
        return status

    @app.get("/orders/{order_id}/trace", response_model=OrderTrace,
             responses={404: {"model": Problem, "description": "Unknown order."}},
             summary="An order's timeline")
    async def trace_order(order_id: uuid.UUID) -> OrderTrace:
        """Placed, published, every receipt of its flow and every outcome, in time order."""
        async with need().engine.connect() as conn:
            found = await OrderStore(conn).trace(order_id)
        if found is None:
            raise HTTPException(404, f"order {order_id} not found")
        return found

    @app.get("/orders", response_model=list[OrderSummary], summary="The latest orders",
             responses={200: {"headers": {"Link": {
                 "description": 'Where the next page is, when there is one: '
                                '`</orders?limit=50&cursor=...>; rel="next"`.',
                 "schema": {"type": "string"}}}}})
    async def list_orders(
        response: Response,
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
            await settle_answered(need(), now, now - late_after)
        async with need().engine.connect() as conn:
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

    @app.get("/subscribers", response_model=list[Subscriber], summary="The subscriber registry")
    async def list_subscribers() -> list[Subscriber]:
        """Every subscriber that announced itself, and what it consumes."""
        async with need().engine.connect() as conn:
            return await OrderStore(conn).list_subscribers()

    @app.delete("/subscribers/{name}", response_model=Subscriber,
                dependencies=[Depends(operator)],
                responses={401: {"model": Problem, "description": "No operator token, or "
                                                                  "not a valid one."},
                           403: {"model": Problem, "description": "Operator actions are off "
                                                                  "(no SHOP_OPERATOR_TOKEN), "
                                                                  "or the API token was sent."},
                           404: {"model": Problem, "description": "Not registered."},
                           409: {"model": Problem, "description": "Still announcing itself."}},
                summary="Retire a subscriber (an operator action)")
    async def retire_subscriber(
        name: str,
        force: Annotated[bool, Query(description="Retire it even though it announced itself "
                                                 "recently (it registers again at its next "
                                                 "announcement if it still runs).")] = False,
    ) -> Subscriber:
        """Take a subscriber that was shut down for good out of the registry, so orders
        placed from now on stop expecting it (and stop showing it late). Orders placed
        before keep whom they expected. Its queue stays on the broker, still bound and
        filling: `GET /system` then reports it as unannounced until it is deleted.

        Refused while the subscriber still announces itself (within two announcement
        intervals), unless `force`. Needs the operator token (`SHOP_OPERATOR_TOKEN`).
        """
        rt = need()
        now = datetime.now(UTC)
        recent_within = timedelta(seconds=2 * settings.announce_interval)
        found: list[Subscriber] = []
        retired = False

        async def work(conn: AsyncConnection) -> list[Event]:
            nonlocal retired
            found.clear()
            retired = False
            store = OrderStore(conn)
            entry = await store.subscriber(name)
            if entry is None:
                return []
            found.append(entry)
            if force or now - entry.last_seen >= recent_within:
                await store.retire_subscriber(name)
                retired = True
            return []

        await rt.execute(work)
        if not found:
            raise HTTPException(404, f"no subscriber named {name!r} is registered")
        if not retired:
            ago = (now - found[0].last_seen).total_seconds()
            raise HTTPException(409, f"subscriber {name!r} announced itself {ago:.0f} s ago "
                                     f"(instance {found[0].instance}): it still runs and "
                                     "would register again; stop it first, or retire it "
                                     "with force=true")
        return found[0]

    @app.get("/system", response_model=SystemReport, summary="Expected vs actual")
    async def system() -> SystemReport:
        """The subscriber registry against the broker's real topology.

        Reports an announced subscriber whose queue is missing or has no consumer, a queue
        bound to an event exchange that nobody announced, stale subscribers, dead letters
        waiting and late orders. The broker is read through the management API (through
        AMQP passive declares when it does not answer). The answer is computed at most once
        a second, however many clients ask.
        """
        return await recent.get(functools.partial(_system, need()))

    async def _system(rt: OrderRuntime) -> SystemReport:
        now = datetime.now(UTC)
        await settle_answered(rt, now, now - late_after)
        async with rt.engine.connect() as conn:
            store = OrderStore(conn)
            registry = await store.list_subscribers()
            late = len(await store.late_orders(now, late_after))
        kit = [Topology(settings.name_prefix).audit_queue]
        expected = sorted({q for s in registry for q in s.consumes.values()} | set(kit))
        # The service's own connection serves the AMQP fallback (the protocol does not promise
        # one: the API's tests run without a broker).
        connection = getattr(rt, "connection", None)
        snapshot = await read_broker(
            settings, expected, exchanges=event_exchanges(settings.name_prefix),
            connection=connection if isinstance(connection, AbstractConnection) else None)
        return compare(snapshot, [Announced(s.name, s.consumes, s.last_seen) for s in registry],
                       prefix=settings.name_prefix, now=now,
                       announce_interval=settings.announce_interval, late_orders=late,
                       kit_queues=kit)

    @app.get("/healthz", response_model=Health,
             responses={503: {"model": Health, "description": "Broker or database down."}},
             summary="Health")
    async def healthz() -> JSONResponse:
        """Checks the broker connection and the database."""
        broker = database = False
        if runtime is not None:
            broker = runtime.broker_ok()
            try:
                database = await runtime.db_ok()
            except Exception:
                database = False
        health = Health(status="ok" if broker and database else "unavailable",
                        broker=broker, database=database)
        return JSONResponse(health.model_dump(), status_code=200 if health.status == "ok"
                            else 503)

    app.include_router(asyncapi_router(settings))
    return app


def asyncapi_router(settings: ServiceSettings,
                    services: Callable[[], Mapping[str, Service[Any]]] = discovery.services
                    ) -> APIRouter:
    """`GET /asyncapi.json`: the event contracts, as `shop events asyncapi` prints them.

    Made on the first request and kept: the services installed do not change while the
    process runs.
    """
    router = APIRouter()
    kept: list[dict[str, Any]] = []

    @router.get("/asyncapi.json", summary="The event contracts (AsyncAPI 3.0)",
                response_description="An AsyncAPI 3.0.0 document.")
    async def asyncapi_document() -> JSONResponse:
        """Every exchange, subscriber queue and message schema, and who produces and who
        consumes each event."""
        if not kept:
            kept.append(asyncapi(services().values(), Topology(settings.name_prefix),
                                 broker_url=settings.amqp_url))
        return JSONResponse(kept[0])

    return router


async def _serve(server: uvicorn.Server, where: str) -> None:
    try:
        await server.serve()
    except SystemExit as exc:
        # uvicorn calls sys.exit() when it cannot bind; inside a task that would escape
        # the event loop, so turn it into an ordinary error the runner reports.
        raise RuntimeError(f"the HTTP API could not start on {where} "
                           "(is the port already in use?)") from exc


async def serve_api(runtime: OrderRuntime) -> None:
    """Serve the API inside the running loop until cancelled, then shut down gracefully."""
    settings = runtime.settings
    if not isinstance(settings, OrderSettings):
        raise TypeError(f"serve_api needs OrderSettings, got {type(settings).__name__}")
    server = Server(server_config(create_app(runtime, settings), settings))
    serving = asyncio.create_task(_serve(server, f"{settings.http_host}:{settings.http_port}"))
    late_after = timedelta(seconds=settings.late_after)
    settling = asyncio.create_task(settle_forever(runtime, late_after,
                                                  every=max(1.0, settings.late_after)))
    try:
        # Shielded so a cancellation lets uvicorn finish open requests and close its socket.
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        await serving
        raise
    finally:
        settling.cancel()


async def settle_forever(rt: OrderRuntime, late_after: timedelta, *, every: float) -> None:
    """Settle the answered orders every `every` seconds, so that a look at late orders
    after a quiet spell (nobody watching, a `shop doctor` from cron) finds a few seconds'
    orders to settle rather than hours' (7 s of transactions for 100,000)."""
    while True:
        now = datetime.now(UTC)
        try:
            await settle_answered(rt, now, now - late_after)
        except Exception as exc:  # the database is away: the next round or a look settles
            log.warning("could not settle answered orders", error=str(exc)[:500])
        await asyncio.sleep(every)  # a period, not a wait for something
