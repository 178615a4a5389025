"""``Connection: close`` on a response when this server process holds more than its share of the
keep-alive connections, so that the client reconnects and the kernel hashes it afresh onto a
process (see app/process/topology.py for why the split is uneven to begin with)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Rebalance:
    def __init__(self, app: ASGIApp, crowded: Callable[[], bool], counter: Counter) -> None:
        self.app = app
        self.crowded = crowded
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and self.crowded():
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
                self.counter.inc()
            await send(message)

        await self.app(scope, receive, sending)
