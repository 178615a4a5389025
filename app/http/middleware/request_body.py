"""The request body as it arrives: its size, its deadline, and the connection it holds. uvicorn
bounds none of them.

- Size: a declared Content-Length over CNNSERVE_MAX_BODY_BYTES is refused before the body is read,
  and a body that grows past it raises PayloadTooLarge from inside receive() (413): a limit checked
  after parsing is no limit (Triton once crashed parsing an oversized body first).
- Time: the whole body must arrive within CNNSERVE_BODY_TIMEOUT_S of the request's start, or
  receive() raises RequestTimeout (408). uvicorn waits for a body as long as its client likes:
  3,000 clients that sent their headers and stalled held 3,000 connections for the 22 s we
  watched. This bounds the connection, for any route; the service's own read timeout
  (``Service._read``, CNNSERVE_REQUEST_TIMEOUT_S) stays, for a different thing: how long an
  admitted request holds its model's capacity while its body comes, whatever the protocol (a gRPC
  adapter would have no HTTP middleware). Counted from the request's start, which comes before
  admission, this deadline falls first unless it is the longer of the two.
- The connection: a response to a request whose body has not all arrived (an early 401, 415 or
  429, a 408, any status) says ``Connection: close``, and the connection closes once the rest of
  the body is in, or at the deadline: a stalled or unread body never keeps a connection. The rest
  is read and dropped before the close, not left unread: a socket closed with unread bytes sends a
  reset, and a client still uploading then fails on its write instead of reading its answer
  (app/http/middleware/rebalance.py met that). The answer itself goes out at once. A body that
  waits for ``100 Continue`` and was never asked for is not asked for then: the connection closes
  at once.

Served by ``cnnserve serve``, the connection does that last part itself (app/process/connection.py,
which says so in ``scope["extensions"]``): it lingers, reading and dropping the rest of the body
below the app, far cheaper than receiving it here message by message, and bounded in time and
bytes. Here (``uvicorn app.main:app``, tests in process) the body is drained through the app.

A client that stalls in the middle of its headers is not bounded here: the app sees a request only
once its headers are complete. app/process/connection.py bounds it (CNNSERVE_HEADER_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.errors import send_error
from app.process.connection import LINGER_EXTENSION
from app.serving.errors import PayloadTooLarge, RequestTimeout

CLOSE = (b"connection", b"close")


def has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:  # raw, lower-case names: no Headers object on every request
        if name == b"transfer-encoding" or (name == b"content-length" and value not in (b"", b"0")):
            return True
    return False


def declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def expects_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope["headers"])


def too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body larger than the limit of {max_bytes} bytes")


class Upload:
    """One request's body, as the app receives it: counted against the limit and the deadline
    while it comes in, and read to its end (or its deadline) when the app answered first."""

    __slots__ = (
        "answered",
        "closing",
        "complete",
        "deadline",
        "destination",
        "loop",
        "max_bytes",
        "received",
        "server_lingers",
        "source",
        "timeout_s",
        "waits_for_continue",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send, max_bytes: int, timeout_s: float) -> None:
        self.source, self.destination = receive, send
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + timeout_s
        self.complete = False
        self.waits_for_continue = expects_continue(scope)
        self.server_lingers = LINGER_EXTENSION in scope.get("extensions", {})
        self.received = 0
        self.answered = False
        self.closing = False

    async def receive(self) -> Message:
        """The next message; RequestTimeout past the deadline while the body is still coming.
        Once it is all in, what follows (the disconnect) is waited for without one."""
        if self.complete:
            return await self.source()
        self.waits_for_continue = False  # uvicorn sends 100 Continue when the body is asked for
        if self.received > self.max_bytes:
            raise too_large(self.max_bytes)
        message = await self.in_time()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                raise too_large(self.max_bytes)
            self.complete = not message.get("more_body", False)
        return message

    async def in_time(self) -> Message:
        """The next message, or RequestTimeout at the deadline."""
        if self.loop.time() >= self.deadline:
            raise self.late()
        try:
            async with asyncio.timeout_at(self.deadline):
                return await self.source()
        except TimeoutError:
            raise self.late() from None

    def late(self) -> RequestTimeout:
        return RequestTimeout(f"the request body took over {self.timeout_s:g} s to arrive")

    async def send(self, message: Message) -> None:
        """``Connection: close`` on a response that starts before the body is all in; its last
        message waits until the rest of the body is drained."""
        if message["type"] == "http.response.start":
            self.answered = True
            if not self.complete:
                self.closing = True
                message = {**message, "headers": [*message.get("headers", []), CLOSE]}
        elif message["type"] == "http.response.body" and self.closing and not message.get("more_body", False):
            if message.get("body"):
                await self.destination({**message, "more_body": True})
            await self.drain()
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await self.destination(message)

    async def drain(self) -> None:
        """Read and drop the rest of the body, up to the limit and the deadline, or until the
        client leaves; a body that waits for 100 Continue is never asked for, and one whose server
        lingers is left to it."""
        if self.waits_for_continue or self.server_lingers:
            return
        with suppress(RequestTimeout, PayloadTooLarge):
            while not self.complete and (await self.receive())["type"] == "http.request":
                pass


class RequestBody:
    """Limits the body's size and time, and closes the connection of a request answered before its
    body was all in (see the module). An oversized body is answered here only if nothing else
    answered; either way the connection closes at once, the rest of the body unread."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not has_body(scope):  # nothing to limit, time or wait for
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self.refuse(scope, send)
            return
        upload = Upload(scope, receive, send, self.max_bytes, self.timeout_s)
        try:
            await self.app(scope, upload.receive, upload.send)
        except PayloadTooLarge:
            if not upload.answered:
                await self.refuse(scope, send)

    async def refuse(self, scope: Scope, send: Send) -> None:
        await send_error(scope["path"], send, too_large(self.max_bytes), {"Connection": "close"})
