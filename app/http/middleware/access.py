"""Access control over HTTP: the scope each path needs, the one credential a request presents, and
the decision of app/serving/access.py (who, which scope, within which rate), before any route runs
and before the body is read.

The scope is decided from the path the router will route, percent-decoded (so an encoded slash
cannot hide ``/v2/repository``), and a path that is not in canonical form (``//``, ``.`` or ``..``
segments) is refused with 400 rather than guessed at: no route needs one. Unknown paths need
``read``, so that a stranger gets 401 rather than a map of the API. Probes, the page and its static
files need nothing; every other method, HEAD and OPTIONS included, needs the path's scope (a CORS
preflight is answered before this, by the CORS middleware, when origins are configured).

One credential per request: ``Authorization: Bearer ...`` or ``X-API-Key: ...``, once. Two of
them (the same header twice, or both headers) are refused as ambiguous, and so is a request that
carries a credential in its query string: URLs end up in logs, histories and Referer headers.
"""

from __future__ import annotations

import posixpath
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.errors import send_error
from app.process.connection import LINGER_EXTENSION
from app.serving.access import OPEN, Access, Grant
from app.serving.errors import BadRequest, RateLimited, ServingError, Unauthorized

OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
OPEN_PREFIX = "/static/"
INFER_PATHS = frozenset({"/classify", "/featuremaps", "/cam", "/preprocess", "/explain/input"})
V2_INFER = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")
CREDENTIAL_IN_QUERY = re.compile(rb"(?:^|&)(?:api[_-]?key|key|token|access_token|authorization)=", re.IGNORECASE)


def scope_of(path: str) -> str:
    """The scope a (canonical) path needs: see app/serving/access.py for what each covers."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
        return OPEN
    if path == "/metrics" or path == "/v2/repository" or path.startswith("/v2/repository/"):
        return "admin"
    if path == "/explain":
        return "explain"
    if path in INFER_PATHS or V2_INFER.match(path):
        return "infer"
    return "read"


def canonical(path: str) -> bool:
    return path == "/" or (posixpath.normpath(path) == path and "//" not in path)


def presented(scope: Scope) -> str | None:
    """The one credential of the request, or None; Unauthorized when it is ambiguous."""
    found = [(name, value) for name, value in scope["headers"] if name in CREDENTIAL_HEADERS]
    if len(found) > 1:
        raise Unauthorized("send one credential: one Authorization or one X-API-Key header", "ambiguous")
    if not found:
        return None
    name, value = found[0]
    text: str = value.decode("latin-1").strip()
    if name == b"x-api-key":
        return text
    kind, _, secret = text.partition(" ")
    secret = secret.strip()
    if kind.lower() != "bearer" or not secret:
        raise Unauthorized("the Authorization header takes 'Bearer KEY_OR_TOKEN'", "unknown")
    return secret


class AccessControl:
    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            grant = self.decide(scope)
        except ServingError as refusal:
            if isinstance(refusal, RateLimited):  # its body is not worth reading (app/process/connection.py)
                scope.get("extensions", {}).get(LINGER_EXTENSION, {})["drop"] = True
            await send_error(scope["path"], send, refusal)
            return
        headers = grant.headers() if grant else None
        if not headers:
            await self.app(scope, receive, send)
            return
        extra = [(name.lower().encode(), value.encode()) for name, value in headers.items()]

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_limits)

    def decide(self, scope: Scope) -> Grant | None:
        path: str = scope["path"]
        if not canonical(path):
            raise BadRequest(f"the path {path!r} is not in canonical form (no '//', '.' or '..' segments)")
        needed = scope_of(path)
        if needed == OPEN:
            return None
        client = scope["client"][0] if scope.get("client") else "-"
        action = f"{scope['method']} {path}"
        if self.access.enabled and CREDENTIAL_IN_QUERY.search(scope.get("query_string", b"")):
            refusal = Unauthorized("credentials in the URL are refused: send them in a header", "in_url")
            self.access.refused(refusal, None, client, action)
            raise refusal
        try:
            secret = presented(scope) if self.access.enabled else None
        except Unauthorized as refusal:
            self.access.refused(refusal, None, client, action)
            raise
        return self.access.admit(secret, needed, client, action)
