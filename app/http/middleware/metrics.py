"""Counts every request by endpoint, model and status, and times it.

A request is counted just before its last body chunk goes out, not after: counted after the send,
a client could read the answer and scrape /metrics (from another server process) before the count
existed, and a test of 60 requests once saw 59.

The labels come from the request itself, never from a side channel written by the routes: the
endpoint is the route template (never the raw path), the model is the one named by the path or
the ``model`` query (the default model for routes that take one and got none), and only names the
repository serves become labels, so a client cannot grow the label set.
"""

from __future__ import annotations

import time

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.inputs import query_value
from app.serving.services import Services


def takes_model(route: BaseRoute | None, known: dict[int, bool]) -> bool:
    """Whether the route has a ``model`` query parameter (and so serves the default model without
    one); asked once per route."""
    key = id(route)
    if key not in known:
        dependant = getattr(route, "dependant", None)
        known[key] = dependant is not None and any(param.alias == "model" for param in dependant.query_params)
    return known[key]


def model_label(scope: Scope, services: Services, known: dict[int, bool]) -> str:
    name = scope.get("path_params", {}).get("name")
    if name is None:
        name = query_value(scope, "model")
        if not name and takes_model(scope.get("route"), known):
            name = services.settings.default_model
    return name if name and services.service.serves(name) else ""


class RequestMetrics:
    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services
        self.metrics = services.metrics
        self.routes_taking_a_model: dict[int, bool] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        counted = False

        def count() -> None:
            nonlocal counted
            counted = True
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            model = model_label(scope, self.services, self.routes_taking_a_model)
            self.metrics.requests.labels(endpoint, model, str(status), "http").inc()
            self.metrics.latency.labels(endpoint, model).observe(time.perf_counter() - started)

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count()
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            if not counted:  # the app failed before answering, or the client left mid-stream
                count()
