"""Every answer carries an ``X-Request-ID`` (the client's, if it sent a sane one), and every log
line written while the request runs carries it too (app/tracing.py). Outermost, so that answers
sent by the other middleware (401, 413, 429) carry it as well."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import tracing

HEADER = tracing.REQUEST_ID_HEADER.encode()


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for key, value in scope["headers"]:
            if key == HEADER:
                given = value.decode("latin-1")
                break
        request_id = tracing.accept_request_id(given)
        tracing.annotate("cnnserve.request_id", request_id)
        header = (HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = tracing.request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            tracing.request_id.reset(token)
