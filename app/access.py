"""Optional API-key authentication: off unless CNNSERVE_API_KEY is set. The probes stay open so
that orchestrators need no secret, and so does the web page (it holds none: the person using it
types the key); keys are compared in constant time."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

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

    def presented(self, scope: Scope) -> bytes | None:
        headers = dict(scope["headers"])
        if b"x-api-key" in headers:
            return headers[b"x-api-key"]
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return token.strip() if scheme.lower() == b"bearer" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in OPEN_PATHS
            or scope["path"].startswith(OPEN_PREFIX)
            or scope["method"] == "OPTIONS"
        ):
            await self.app(scope, receive, send)
            return
        presented = self.presented(scope)
        if presented is not None and hmac.compare_digest(presented, self.key):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"})
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})
