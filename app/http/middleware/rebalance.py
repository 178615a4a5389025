"""``Connection: close`` on a response when this server process holds more than its share of the
keep-alive connections, so that the client reconnects and the kernel hashes it afresh onto a
process (see app/process/topology.py for why the split is uneven to begin with).

Never on a response that went out before the request's body was read (a 429 at admission is
answered unread): closing then would cut a client off mid-upload, and it would see a broken pipe
instead of its answer. Such a response closes its connection anyway, but only once the rest of the
body has been read (app/http/middleware/request_body.py).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.middleware.request_body import has_body


class Rebalance:
    def __init__(self, app: ASGIApp, crowded: Callable[[], bool], counter: Counter) -> None:
        self.app = app
        self.crowded = crowded
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        unread = has_body(scope)

        async def receiving() -> Message:
            nonlocal unread
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                unread = False
            return message

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and not unread and self.crowded():
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
                self.counter.inc()
            await send(message)

        await self.app(scope, receiving, sending)
