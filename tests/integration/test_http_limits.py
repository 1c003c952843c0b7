"""The order API's HTTP server on real sockets: a bounded request head, head, body and idle
timeouts, and a bound on connections, each with short limits set for the test."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from order_service.api.server import LimitedHttpToolsProtocol, Server, server_config
from order_service.settings import OrderSettings
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

#: Seconds of a timeout under test: short, so a test takes a fraction of a second.
SHORT = 0.3
#: The longest any test waits for the server to act.
DEADLINE = 10.0


class Echo:
    """An ASGI app that reads the whole body and answers its length; it notes a client gone
    mid-request."""

    def __init__(self) -> None:
        self.disconnects = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = str(size).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class Served:
    """A running server's port, and the connections a test opened to it (closed after)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.clients: list[Client] = []

    async def connect(self) -> Client:
        client = Client(*await asyncio.open_connection("127.0.0.1", self.port))
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def serving(app: Any, **limits: Any) -> AsyncIterator[Served]:
    """The order API's server (its configuration from OrderSettings with these limits) on a
    free loopback port, in this event loop."""
    settings = OrderSettings(api_token=None, operator_token=None, **limits)
    server = Server(server_config(app, settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))

    async def started() -> bool:
        if task.done():
            task.result()
        return server.started

    served = Served(int(sock.getsockname()[1]))
    try:
        await wait_for(started, timeout=DEADLINE, what="the server to start")
        yield served
    finally:
        for client in served.clients:
            await client.close()
        server.should_exit = True
        await task
        sock.close()


class Client:
    """One raw connection: bytes out, bytes in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout: float = DEADLINE) -> bytes:
        """Everything the server sends until it closes the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def response(self) -> bytes:
        """One response with a Content-Length body, the connection kept."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), DEADLINE)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return head + await asyncio.wait_for(self.reader.readexactly(length), DEADLINE)

    async def closed(self) -> bool:
        """Whether the server closed the connection (waits up to the deadline)."""
        return await asyncio.wait_for(self.reader.read(1), DEADLINE) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def get(extra: bytes = b"") -> bytes:
    return b"GET / HTTP/1.1\r\nHost: localhost\r\n" + extra + b"\r\n"


async def test_a_request_head_over_the_limit_gets_431_and_the_connection_closes() -> None:
    """A head of one header over ORDER_MAX_HEADER_BYTES: 431 saying the limit, then closed.
    A head within it, sent in the same write as a body several times the limit, is served:
    only the head counts."""
    async with serving(Echo(), max_header_bytes=2048) as server:
        client = await server.connect()
        await client.send(get(b"X-Big: " + b"a" * 3000 + b"\r\n"))
        answer = await client.answer()
        assert status(answer) == 431
        assert b"request head larger than 2048 bytes" in answer
        assert b"connection: close" in answer.lower()

        client = await server.connect()
        body = b"b" * 60_000
        await client.send(b"POST / HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"p" * 1900
                          + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                          + body)
        answer = await client.response()
        assert status(answer) == 200
        assert answer.endswith(b"60000")
        await client.close()


async def test_a_head_trickled_without_end_is_cut_at_the_limit() -> None:
    """A header that never ends, sent a little at a time: the server stops it with 431 once
    the head passes the limit, having buffered no more than that (it was 4 MB a connection
    and counting)."""
    async with serving(Echo(), max_header_bytes=4096) as server:
        client = await server.connect()
        await client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Endless: ")
        sent = 0
        answer = b""
        while not answer and sent < 64 * 1024:
            try:
                await client.send(b"x" * 512)
            except ConnectionError:
                break
            sent += 512
            with contextlib.suppress(TimeoutError):  # nothing yet: go on trickling
                answer = await asyncio.wait_for(client.reader.read(1000), 0.05)
        assert status(answer) == 431
        assert sent <= 4096 + 512  # the limit, give or take the piece in flight


async def test_a_head_that_does_not_arrive_in_time_gets_408() -> None:
    """A head trickled a byte at a time past ORDER_HEADER_TIMEOUT: 408, then closed, though
    bytes kept coming (the keep-alive timer alone was reset by every byte)."""
    async with serving(Echo(), header_timeout=SHORT) as server:
        client = await server.connect()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        answer = b""
        while not answer and loop.time() - started < DEADLINE:
            with contextlib.suppress(ConnectionError):
                await client.send(b"X")
            with contextlib.suppress(TimeoutError):  # nothing yet: one more byte
                answer = await asyncio.wait_for(client.reader.read(1000), 0.05)
        took = loop.time() - started
        assert status(answer) == 408, answer
        assert b"request head not received within 0.3 s" in answer
        assert SHORT <= took < DEADLINE
        assert await client.closed()


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout() -> None:
    """A connection opened and left silent is closed (quietly: no request, no answer)."""
    async with serving(Echo(), header_timeout=SHORT) as server:
        client = await server.connect()
        assert await client.answer() == b""


async def test_a_body_that_does_not_arrive_in_time_gets_408() -> None:
    """A body announced but sent only in part within ORDER_BODY_TIMEOUT: 408, closed, and
    the application reading it sees the client gone instead of waiting for ever."""
    app = Echo()
    async with serving(app, body_timeout=SHORT) as server:
        client = await server.connect()
        await client.send(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n"
                          + b"b" * 10)
        answer = await client.answer()
        assert status(answer) == 408
        assert b"request body not received within 0.3 s" in answer

        async def app_told() -> bool:
            return app.disconnects == 1

        await wait_for(app_told, timeout=DEADLINE, what="the application to see a disconnect")


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout() -> None:
    """After a response, a connection with nothing more to ask is closed after
    ORDER_KEEPALIVE_TIMEOUT; a request on it before then is served, under the header
    timeout counted from its first byte."""
    async with serving(Echo(), keepalive_timeout=SHORT, header_timeout=5) as server:
        client = await server.connect()
        await client.send(get())
        assert status(await client.response()) == 200
        await client.send(get())
        assert status(await client.response()) == 200
        loop = asyncio.get_running_loop()
        idle = loop.time()
        assert await client.closed()
        assert loop.time() - idle < 4  # ours, not uvicorn's default of 5 s


async def test_connections_beyond_the_bound_get_503_and_a_freed_place_is_taken() -> None:
    """ORDER_MAX_CONNECTIONS open: one more is answered 503 and closed at once; once one
    closes, a new connection is served."""
    async with serving(Echo(), max_connections=3) as server:
        held = [await server.connect() for _ in range(3)]
        for client in held:
            await client.send(get())
            assert status(await client.response()) == 200
        extra = await server.connect()
        answer = await extra.answer()
        assert status(answer) == 503
        assert b"too many connections" in answer

        await held.pop().close()

        async def served() -> bool:
            client = await server.connect()
            try:
                await client.send(get())
                return status(await client.response()) == 200
            except (ConnectionError, asyncio.IncompleteReadError):
                return False

        assert await wait_for(served, timeout=DEADLINE, what="a freed place to be taken")


def test_the_protocol_still_hooks_into_uvicorn() -> None:
    """The server config hands uvicorn our protocol, and every method it overrides is one
    uvicorn's httptools protocol has with the same parameters (a uvicorn release renaming
    one would silently drop a limit: this fails instead)."""
    config = server_config(Echo(), OrderSettings(api_token=None, operator_token=None))
    config.load()
    assert issubclass(config.http_protocol_class, LimitedHttpToolsProtocol)
    overridden = {name for name, value in vars(LimitedHttpToolsProtocol).items()
                  if inspect.isfunction(value) and not name.startswith("_")}
    assert overridden == {"connection_made", "connection_lost", "data_received",
                          "on_message_begin", "on_headers_complete", "on_message_complete"}
    for name in overridden:
        ours = inspect.signature(getattr(LimitedHttpToolsProtocol, name))
        theirs = inspect.signature(getattr(HttpToolsProtocol, name))
        assert list(ours.parameters) == list(theirs.parameters), name
