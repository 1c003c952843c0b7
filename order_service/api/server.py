"""The order API's HTTP server: uvicorn, with the limits its httptools protocol lacks.

uvicorn's httptools protocol (kept for speed, see pyproject.toml) bounds neither the size
of a request head nor the time to send it: an 8 MB header was answered 200, and a head
trickled byte by byte is buffered whole for as long as the client likes. Its keep-alive
timer starts only after a response, so a connection that never sends a request is never
closed; and `limit_concurrency` answers 503 only once a head is complete, so it does not
bound connections. The subclass below adds each at the protocol's own hooks (the parser's
callbacks and the asyncio protocol's methods); `tests/integration/test_http_limits.py`
checks them on real sockets, and that uvicorn still calls them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from asyncio import TimerHandle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from order_service.settings import OrderSettings


@dataclass(frozen=True)
class Limits:
    """What one connection may take: head size, time for the head and the body, and how
    many connections the server keeps open at once."""

    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int

    @classmethod
    def of(cls, settings: OrderSettings) -> Limits:
        return cls(max_header_bytes=settings.max_header_bytes,
                   header_timeout=settings.header_timeout, body_timeout=settings.body_timeout,
                   max_connections=settings.max_connections)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded head, head and body timeouts, and a bound
    on connections. One instance per connection; `limits` is set on a subclass per server
    (`protocol_with`)."""

    limits: ClassVar[Limits]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._reading_head = True  # from a request's first byte (or none yet) to its head's end
        self._head_bytes = 0
        self._deadline: TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "too many connections: try again shortly")
            return
        # A new connection has until then to send a request head: one that sends nothing
        # is closed, where uvicorn alone would keep it.
        self._arm(self.limits.header_timeout, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if not self._in_head():
            super().data_received(data)
            return
        # Feed the parser no more than the head may still take: if the head did not end
        # within that, it is too large, and nothing beyond the limit was buffered. Bytes that
        # follow a body in the same read (a pipelined request) are counted from the next read.
        room = self.limits.max_header_bytes - self._head_bytes
        head, rest = data[:room], data[room:]
        self._head_bytes += len(head)
        if head:
            super().data_received(head)
        if rest and not self.transport.is_closing():
            if self._in_head():  # the parser did not reach the head's end
                self._refuse(431, f"request head larger than {self.limits.max_header_bytes} "
                                  "bytes")
                return
            self.data_received(rest)

    def _in_head(self) -> bool:
        """Reading a request head (or waiting for one), as the parser callbacks last said."""
        return self._reading_head

    # Parser callbacks (httptools calls them by name).

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a request on a kept-alive connection: from its first byte
            self._arm(self.limits.header_timeout, self._head_too_slow)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        self._disarm()
        super().on_headers_complete()
        self._arm(self.limits.body_timeout, self._body_too_slow)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._reading_head = True

    # Timers and refusals.

    def _arm(self, seconds: float, then: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, then)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        self._deadline = None
        if self._head_bytes == 0:  # nothing sent at all: an idle connection, closed quietly
            self.transport.close()
            return
        self._refuse(408, f"request head not received within {self.limits.header_timeout:g} s")

    def _body_too_slow(self) -> None:
        self._deadline = None
        self._refuse(408, f"request body not received within {self.limits.body_timeout:g} s")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer `status` and close the connection, unless a response already started; the
        request's application (if it runs) sees the client gone."""
        self._disarm()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            body = json.dumps({"detail": detail}).encode()
            head = [STATUS_LINE[status]]
            head += [name + b": " + value + b"\r\n"
                     for name, value in self.server_state.default_headers]
            head += [b"content-type: application/json\r\n",
                     b"content-length: " + str(len(body)).encode() + b"\r\n",
                     b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def protocol_with(limits: Limits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for one server, carrying its limits (uvicorn builds one instance
    per connection from a class it is given)."""

    class Bound(LimitedHttpToolsProtocol):
        pass

    Bound.limits = limits
    return Bound


def server_config(app: ASGIApp, settings: OrderSettings) -> uvicorn.Config:
    """uvicorn's configuration for the order API: where it listens, its limits, and no log
    configuration or lifespan of its own (the service owns both)."""
    return uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port,
        http=protocol_with(Limits.of(settings)),
        # Annotated int, used as a delay for call_later: a fraction of a second works.
        timeout_keep_alive=settings.keepalive_timeout,  # type: ignore[arg-type]
        log_config=None, lifespan="off", timeout_graceful_shutdown=5)


class Server(uvicorn.Server):
    """uvicorn without its own signal handling: the kit's runner owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
