"""A request for a model at capacity, refused before FastAPI parses it.

Refused by the operation itself, a request to a full model went through FastAPI's routing, the
parsing of its parameters and its error handling first: 255 us of the event loop a refusal at
/featuremaps, measured in-process (``python -m bench.refusals --in-process /featuremaps``),
against 53 us here. A flood of uploads to a full model is mostly refusals, and the loop that makes
them also answers the probes (README "Access control"). So for the routes that take an upload
and cost inference, this asks the service first (``Service.refuse_if_full``, which knows what
each operation costs), for the model and version the request names (the default model and the
newest version when it names none), and answers 429 with Retry-After at once; the connection
then lingers over the unread body, as after any early answer (app/process/connection.py).

It runs inside access control, so a stranger learns nothing of the load (401 and 403 come first),
and inside the body's limits (a declared oversized body gets its 413 first). A request refused
here is checked no further: a full model answers 429 to a request with a bad parameter or media
type too, and the client hears of those once the model has room. The route the request would
have taken goes into its scope as routing puts it, so that /metrics count it under its endpoint
and model as before. A request it lets through pays for the check: 0.9 us without a query string,
4.3 us with one to parse (measured in-process on /classify), against some 850 us of server CPU for
the cheapest whole request (LeNet-5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from app.http.errors import send_error
from app.http.inputs import query_value
from app.http.middleware.access import V2_INFER
from app.serving.errors import Overloaded
from app.serving.service import Service

UPLOADS = {  # path: the Service operation it calls
    "/classify": "classify",
    "/preprocess": "given",
    "/explain/input": "given_values",
    "/featuremaps": "featuremaps",
    "/cam": "cam",
    "/explain": "explain",
}
V2_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")


@dataclass(frozen=True)
class Operation:
    name: str  # the Service method
    route: APIRoute
    versioned: bool  # takes a ``version`` query parameter


def operations(routes: Sequence[BaseRoute]) -> dict[str, Operation]:
    """The routes this checks, by path template, from the routers' own (the objects routing puts in
    a request's scope): which take a version is the route's to say (a version asked of a route
    without one is ignored there, and so here)."""
    found = {}
    for route in routes:
        if isinstance(route, APIRoute) and "POST" in (route.methods or ()) and route.path in (*UPLOADS, *V2_PATHS):
            versioned = any(param.alias == "version" for param in route.dependant.query_params)
            found[route.path] = Operation(UPLOADS.get(route.path, "infer"), route, versioned)
    return found


class CapacityFirst:
    def __init__(self, app: ASGIApp, service: Service, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.service = service
        self.operations = operations(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            try:
                self.refuse_if_full(scope)
            except Overloaded as refusal:
                await send_error(scope["path"], send, refusal)
                return
        await self.app(scope, receive, send)

    def refuse_if_full(self, scope: Scope) -> None:
        path: str = scope["path"]
        params: dict[str, Any] = {}
        if path in UPLOADS:
            template, name = path, query_value(scope, "model") or None
        elif v2 := V2_INFER.match(path):
            params = {key: value for key, value in v2.groupdict().items() if value is not None}
            template, name = V2_PATHS[1] if "version" in params else V2_PATHS[0], params["name"]
        else:
            return
        operation = self.operations.get(template)
        if operation is None:
            return
        version = params.get("version") or (query_value(scope, "version") if operation.versioned else None)
        try:
            self.service.refuse_if_full(operation.name, name, version)
        except Overloaded:
            scope["route"], scope["path_params"] = operation.route, params  # as routing would have
            raise
