"""The request body limit, enforced as the bytes arrive: uvicorn has none of its own, and a limit
checked after parsing is no limit (Triton once crashed parsing an oversized body first)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.errors import send_error
from app.serving.errors import PayloadTooLarge


def too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body larger than the limit of {max_bytes} bytes")


class BodyLimit:
    """A declared Content-Length over the limit is refused before the body is read; a body that
    grows past it raises PayloadTooLarge from inside receive(), which the app's one handler turns
    into a 413 wherever the body is being read. The middleware answers itself only if nothing
    else did, and closes the connection: the rest of the body is never read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(scope, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(self.max_bytes)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except PayloadTooLarge:
            if not started:
                await self.refuse(scope, send)

    async def refuse(self, scope: Scope, send: Send) -> None:
        await send_error(scope["path"], send, too_large(self.max_bytes), {"Connection": "close"})
