"""One HTTP connection, as uvicorn's httptools protocol handles it, with two bounds it lacks.

- A header timeout: a connection that has not sent a request's complete headers within
  CNNSERVE_HEADER_TIMEOUT_S of its opening (or of its request's first byte, on a kept-alive
  connection) is closed, within SWEEP_SECONDS after. The app sees a request only once its headers
  are complete, and uvicorn has no such timeout (``timeout_keep_alive`` counts only the wait
  between requests), so without this a client that sends half a header line and stalls holds its
  connection, and a file descriptor, for ever; nginx's ``client_header_timeout`` is the same bound.
- A lingering close: a response sent before its request's body has all arrived (a 401, 403, 429,
  413 or 415 refusal) ends with ``Connection: close`` (app/http/middleware/request_body.py); the
  connection then drops what the client still sends and closes once the body is in, after
  LINGER_SECONDS, or after LINGER_BYTES, whichever comes first: nginx's ``lingering_close``, with
  its reason (closed with unread bytes, a socket sends a reset, and a client still uploading
  fails on its write instead of reading its answer). A body of known length on a plain TCP
  connection is dropped by the kernel without being copied (``recv`` with ``MSG_TRUNC``), so a
  refusal costs a few system calls whatever the body's size; over TLS, or chunked, it goes through
  the parser without reaching the app. Measured on 3 MB uploads refused with 401 (8 clients, one
  process, two cores): 4.2 ms of server CPU a refusal when the app drained the body 64 KiB message
  by message, 2.0 ms read below the app, and with MSG_TRUNC the figure in README "Access control".
  A client that keeps sending past the bound finds the connection reset.

``LINGER_EXTENSION`` in the request's ``scope["extensions"]`` tells the app that the server lingers,
so that the app does not drain the body itself; the app may set ``"drop": True`` in it to have the
connection closed at once, its body unread (a client over its rate limit, sending again at once:
whatever it sends costs the server nothing more, and a flood of such clients cannot crowd out
/healthz with bodies to drop).

What the two cost every request is kept to a few attribute writes: no timer per request, and the
transport's methods that uvicorn calls on each one bound to the wrapper directly. A timer per
request and a wrapper that forwarded every call made LeNet-5 requests 6-7% slower than uvicorn's
own protocol (wrk, one process, in turn); with neither, within 1.4% (README "GPU", on the CPU
deployment before and after).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.metrics import Metrics

LINGER_EXTENSION = "cnnserve.lingering_close"
LINGER_SECONDS = 2.0
SWEEP_SECONDS = 1.0  # at most this late, a connection whose headers are overdue is closed
LINGER_BYTES = 32 << 20  # above the default body limit: any body the service accepts is let finish
SINK = bytearray(1 << 20)  # what MSG_TRUNC reads into: the kernel writes nothing there


class LingeringTransport:
    """The connection's transport as uvicorn's code sees it: its ``close()`` lingers while the
    request's body is still coming (see the module). The methods uvicorn calls on every request
    are the transport's own, bound once, so that the wrapper adds no call to them."""

    def __init__(self, transport: asyncio.Transport, connection: Connection) -> None:
        self.transport = transport
        self.connection = connection
        self.write = transport.write
        self.get_extra_info = transport.get_extra_info
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading

    def close(self) -> None:
        if self.connection.lingering:
            return
        if not self.transport.is_closing() and self.connection.body_pending():
            self.connection.linger()
        else:
            self.transport.close()

    def is_closing(self) -> bool:
        return self.connection.lingering or self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class Connection(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout and a lingering close (see the module);
    ``connection_class`` gives it its settings. The header timeout costs no timer per request: a
    request notes when its headers began, and one sweep per event loop, every SWEEP_SECONDS at
    most, closes the connections whose headers are overdue."""

    header_timeout_s = 10.0
    metrics: Metrics | None = None
    swept = False  # whether this class's sweep runs (one class per server process)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.headers_since: float | None = None  # when the request's headers began, until they are in
        self.linger_timer: asyncio.TimerHandle | None = None
        self.lingering = False
        self.lingered = 0
        self.message_done = True
        self.body_received = 0
        self.body_left: int | None = None  # of the declared Content-Length, what has not arrived
        self.options: dict[str, bool] = {}  # what the app asks of the close (LINGER_EXTENSION)
        self.sink: socket.socket | None = None
        self.raw: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.raw = transport
        super().connection_made(LingeringTransport(transport, self))  # type: ignore[arg-type]
        self.headers_since = self.loop.time()
        if not self.swept:
            type(self).swept = True
            self.loop.call_later(self.sweep_seconds(), self.sweep, self.loop, self.connections)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.linger_timer is not None:
            self.linger_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.lingered += len(data)
            if self.lingered > LINGER_BYTES:
                self.close_now()
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.message_done = False
        self.body_received = 0
        self.options = {}
        self.scope["extensions"] = {LINGER_EXTENSION: self.options}  # type: ignore[dict-item]
        if self.headers_since is None:
            self.headers_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self.headers_since = None
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.body_received += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.message_done = True
        if self.lingering:
            self.close_now()
            return
        super().on_message_complete()

    @classmethod
    def sweep_seconds(cls) -> float:
        return min(SWEEP_SECONDS, cls.header_timeout_s / 4)

    @classmethod
    def sweep(cls, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        """Close the connections whose request headers are overdue; again in sweep_seconds()."""
        now = loop.time()
        for connection in [c for c in connections if isinstance(c, Connection) and c.headers_overdue(now)]:
            connection.headers_too_slow()
        loop.call_later(cls.sweep_seconds(), cls.sweep, loop, connections)

    def headers_overdue(self, now: float) -> bool:
        return self.headers_since is not None and now - self.headers_since >= self.header_timeout_s

    def headers_too_slow(self) -> None:
        self.headers_since = None
        if self.raw is not None and not self.raw.is_closing():
            if self.metrics is not None:
                self.metrics.header_timeouts.inc()
            self.raw.close()

    def body_pending(self) -> bool:
        """Whether the request's body is still coming: not all in, and not waiting for a 100 Continue
        that was never sent (uvicorn sends it when the app first asks for the body)."""
        if self.cycle is None or self.message_done:
            return False
        return self.body_received > 0 or not self.expect_100_continue

    def linger(self) -> None:
        """Drop the rest of the body (see the module). What uvicorn had already buffered of it for
        the app, up to 64 KiB and the data in flight, is dropped too: nothing will read it, and a
        connection and its request cycle refer to each other, so that it would wait for the
        garbage collector's oldest generation (measured: 52 MB of such bodies per process, and
        resident memory 300 MB up, in 12 s of 64 clients resending 0.7 MB uploads after 429s)."""
        self.lingering = True
        if self.cycle is not None:
            self.cycle.body.clear()
        lengths = [value for name, value in self.headers if name == b"content-length"]
        declared = int(lengths[0]) if len(lengths) == 1 and lengths[0].isdigit() else None
        self.body_left = None if declared is None else declared - self.body_received
        if self.options.get("drop"):
            self.close_now()
            return
        self.linger_timer = self.loop.call_later(LINGER_SECONDS, self.close_now)
        if not self.drop_in_kernel():
            self.flow.resume_reading()  # through the parser, which passes nothing on

    def drop_in_kernel(self) -> bool:
        """Read the rest of a body of known length with MSG_TRUNC, on a plain TCP socket."""
        raw = self.raw
        if raw is None or self.body_left is None or raw.get_extra_info("sslcontext") is not None:
            return False
        connected = raw.get_extra_info("socket")
        if connected is None or connected.fileno() < 0:
            return False
        raw.pause_reading()
        self.sink = socket.socket(fileno=os.dup(connected.fileno()))
        self.sink.setblocking(False)
        self.loop.add_reader(self.sink.fileno(), self.drop)
        return True

    def drop(self) -> None:
        assert self.sink is not None and self.body_left is not None
        try:
            dropped = self.sink.recv_into(SINK, min(len(SINK), max(1, self.body_left)), socket.MSG_TRUNC)
        except BlockingIOError:
            return
        except OSError:
            dropped = 0
        self.body_left -= dropped
        self.lingered += dropped
        if dropped == 0 or self.body_left <= 0 or self.lingered > LINGER_BYTES:
            self.close_now()

    def close_now(self) -> None:
        if self.sink is not None:
            self.loop.remove_reader(self.sink.fileno())
            self.sink.close()
            self.sink = None
        if self.linger_timer is not None:
            self.linger_timer.cancel()
        if self.raw is not None:
            self.raw.close()


def connection_class(header_timeout_s: float, metrics: Metrics | None) -> type[Connection]:
    """The protocol class uvicorn builds each connection from, with these settings."""
    return type("Connection", (Connection,), {"header_timeout_s": header_timeout_s, "metrics": metrics})
