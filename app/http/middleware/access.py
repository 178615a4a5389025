"""Optional API-key authentication: off unless CNNSERVE_API_KEY is set. The probes stay open so
that orchestrators need no secret, and so does the web page (it holds none: the person using it
types the key); keys are compared in constant time."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.http.errors import send_error
from app.serving.errors import Unauthorized

OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
OPEN_PREFIX = "/static/"


class ApiKey:
    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    @staticmethod
    def open(scope: Scope) -> bool:
        path = scope["path"]
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIX) or scope["method"] == "OPTIONS"

    @staticmethod
    def presented(scope: Scope) -> bytes | None:
        headers = Headers(scope=scope)
        if "x-api-key" in headers:
            return headers["x-api-key"].encode("latin-1")
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return token.strip().encode("latin-1") if scheme.lower() == "bearer" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.open(scope):
            await self.app(scope, receive, send)
            return
        presented = self.presented(scope)
        if presented is not None and hmac.compare_digest(presented, self.key):
            await self.app(scope, receive, send)
            return
        refusal = Unauthorized("missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        await send_error(scope["path"], send, refusal)
