"""One HTTP connection, as uvicorn's httptools protocol handles it, with two bounds it lacks.

- A header timeout: a connection that has not sent a request's complete headers within
  CNNSERVE_HEADER_TIMEOUT_S of its opening (or of its request's first byte, on a kept-alive
  connection) is closed. The app sees a request only once its headers are complete, and uvicorn has
  no such timeout (``timeout_keep_alive`` counts only the wait between requests), so without this a
  client that sends half a header line and stalls holds its connection, and a file descriptor, for
  ever; nginx's ``client_header_timeout`` is the same bound.
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
LINGER_BYTES = 32 << 20  # above the default body limit: any body the service accepts is let finish
SINK = bytearray(1 << 20)  # what MSG_TRUNC reads into: the kernel writes nothing there


class LingeringTransport:
    """The connection's transport as uvicorn's code sees it: its ``close()`` lingers while the
    request's body is still coming (see the module)."""

    def __init__(self, transport: asyncio.Transport, connection: Connection) -> None:
        self.transport = transport
        self.connection = connection

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
    ``connection_class`` gives it its settings."""

    header_timeout_s = 10.0
    metrics: Metrics | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        self.linger_timer: asyncio.TimerHandle | None = None
        self.lingering = False
        self.lingered = 0
        self.message_done = True
        self.body_seen = False
        self.body_left: int | None = None  # of the declared Content-Length, what has not arrived
        self.options: dict[str, bool] = {}  # what the app asks of the close (LINGER_EXTENSION)
        self.sink: socket.socket | None = None
        self.raw: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.raw = transport
        super().connection_made(LingeringTransport(transport, self))  # type: ignore[arg-type]
        self.start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.header_timer, self.linger_timer):
            if timer is not None:
                timer.cancel()
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
        self.body_seen = False
        self.options = {}
        self.scope["extensions"] = {LINGER_EXTENSION: self.options}  # type: ignore[dict-item]
        self.start_header_timer()

    def on_headers_complete(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        lengths = [value for name, value in self.headers if name == b"content-length"]
        self.body_left = int(lengths[0]) if len(lengths) == 1 and lengths[0].isdigit() else None
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.body_seen = True
        if self.body_left is not None:
            self.body_left -= len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.message_done = True
        if self.lingering:
            self.close_now()
            return
        super().on_message_complete()

    def start_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_too_slow)

    def headers_too_slow(self) -> None:
        self.header_timer = None
        if self.raw is not None and not self.raw.is_closing():
            if self.metrics is not None:
                self.metrics.header_timeouts.inc()
            self.raw.close()

    def body_pending(self) -> bool:
        """Whether the request's body is still coming: not all in, and not waiting for a 100 Continue
        that was never sent (uvicorn sends it when the app first asks for the body)."""
        if self.cycle is None or self.message_done:
            return False
        return self.body_seen or not self.expect_100_continue

    def linger(self) -> None:
        self.lingering = True
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
