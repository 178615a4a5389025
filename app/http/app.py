"""The HTTP app factory: routers, middleware and the one error handler around the services it is
handed. ``create_app(settings)`` or ``create_app(services=...)`` builds nothing it is given; ``app/main.py`` holds the
``app`` that ``uvicorn app.main:app`` serves."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.telemetry import TelemetryConfig

from app import tracing
from app.config import Settings
from app.http import errors
from app.http.middleware.access import AccessControl
from app.http.middleware.capacity import CapacityFirst
from app.http.middleware.metrics import RequestMetrics
from app.http.middleware.rebalance import Rebalance
from app.http.middleware.request_body import RequestBody
from app.http.middleware.request_id import RequestId
from app.http.routes import classify, explain, featuremaps, health, models, page, v2
from app.http.routes import repository as repository_api
from app.serving import services as wiring
from app.serving.access import Access
from app.serving.services import Services

log = logging.getLogger("cnnserve")

VERSION = "0.1.0"
GC_YOUNG_THRESHOLD = 50_000  # allocations between young-generation collections (CPython's default: 700)
EXPOSED_HEADERS = [
    "Retry-After",
    "X-Request-ID",
    "X-Layer",
    "X-Shape",
    "X-Channels",
    "X-Class-Index",
    "X-Class-Label",
    "X-Class-Score",
]

DESCRIPTION = """CNN image classifiers from the model repository, on ONNX Runtime.

Send an image (multipart field `file`, or the raw body with an `image/*` content type) to
`/classify` for the top-k classes. Errors are JSON `{"detail": ...}` (`{"error": ...}` under `/v2`)
with a 4xx a client can act on.
"""


def configure_logging(level: str) -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s%(request)s")
        )
        handler.addFilter(tracing.RequestIdFilter())
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def settle_garbage_collector() -> None:
    """Move everything alive after loading out of the collector's sight and collect young objects
    less often: full collections that walked the models and the framework stalled requests for
    milliseconds (measured: LeNet-5's p99 at 8 connections fell from 17 ms to 8 ms)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def load_models(services: Services) -> None:
    """Load in a worker thread, so that the event loop goes on meanwhile (answering /healthz, and
    /readyz with 503, unless the process loads before it serves: ``lifespan_of``)."""
    settings, service = services.settings, services.service
    started = time.perf_counter()
    await asyncio.to_thread(services.control.load_initial)
    settle_garbage_collector()
    readiness = service.readiness()
    log.info(
        "%d model(s) loaded, %d refused, in %.2f s from %s (model control: %s); default model %s is %s",
        readiness.models_loaded,
        readiness.models_failed,
        time.perf_counter() - started,
        settings.models_dir,
        settings.model_control,
        settings.default_model,
        "ready" if service.serves(settings.default_model) else "NOT available",
    )


async def watch_after(loading: asyncio.Task[None], services: Services) -> None:
    """Once the models are loaded, the model control's watching (poll mode, or explicit mode with
    other processes to follow), until cancelled at shutdown."""
    await asyncio.wait([loading])
    if not loading.cancelled() and loading.exception() is None:
        await services.control.run()


def telemetry() -> TelemetryConfig:
    """FastAPI's own OpenTelemetry: the HTTP server span (continuing the caller's traceparent)
    when app/tracing.py traces, else nothing at all: left on, FastAPI asks whether OpenTelemetry
    is configured on every request (3% of a LeNet-5 request)."""
    on = tracing.enabled()
    return {
        "tracer_provider": tracing.provider(),
        "tracing": on,
        "metrics": False,
        "logs": False,
        "operation_spans": False,
        "auto_configure": False,
    }


Companion = Callable[[], AbstractAsyncContextManager[object]]
"""What else serves beside the HTTP app, in its event loop, for as long as it serves (gRPC)."""


def lifespan_of(
    services: Services, load_first: bool = False, companion: Companion | None = None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Load the models while serving (the default), or, with ``load_first``, before: uvicorn
    accepts connections only once the lifespan has started.

    Serving while loading is how a service starts: nothing else answers its port yet, and a
    probe must see it alive (/healthz) and not ready (/readyz 503) through a load that takes
    seconds on a CPU and longer on a GPU, or Kubernetes restarts it before it ever loads.

    Loading first is how a replacement starts (app/process/supervisor.py): its siblings answer the
    probes, and its socket is already listening (the supervisor holds it), so the kernel keeps
    handing it connections. Served while loading, each got a 503 (measured: 557 of 3,815 requests
    at 8 connections); held in the socket's backlog until the models are loaded and warm, they
    wait a second or two and are answered (tests/app/test_recovery.py). A load that fails is
    raised at shutdown either way, the process serving its 503s meanwhile.

    After the loading, a second task watches the repository (app/serving/control.py) until
    shutdown cancels it. A ``companion`` (the gRPC server) serves from the start as HTTP does, and
    stops, letting its calls in flight finish, before the repository closes."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load_models(services))
        if load_first:
            await asyncio.wait([loading])
        watching = asyncio.create_task(watch_after(loading, services))
        try:
            async with companion() if companion else contextlib.nullcontext():
                yield
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            await loading
            await services.repository.close()

    return lifespan


def create_app(
    settings: Settings | None = None,
    services: Services | None = None,
    *,
    crowded: Callable[[], bool] | None = None,
    load_first: bool = False,
    companion: Companion | None = None,
) -> FastAPI:
    """The app over ``services`` (built from ``settings``, by default from the environment, when
    not given); ``crowded`` says when this process should send a keep-alive client away;
    ``load_first`` holds connections back until the models are loaded (``lifespan_of``);
    ``companion`` serves beside it for as long as it serves (gRPC, from app/process/server.py)."""
    if services is not None and settings is not None and settings is not services.settings:
        raise ValueError("create_app takes settings or services built from them, not both")
    settings = services.settings if services else (settings or Settings())
    services = services or wiring.build(settings)
    configure_logging(settings.log_level)
    tracing.configure_from_environment()
    app = FastAPI(
        title="cnnserve",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan_of(services, load_first, companion),
        telemetry=telemetry(),
    )
    app.state.services = services
    errors.install(app)
    routers = (classify, featuremaps, explain, models, health, v2, page)
    for router in (r.router for r in routers):
        app.include_router(router)
    if services.control.managed:  # off (CNNSERVE_MODEL_CONTROL=none), its paths are unknown: 404
        app.include_router(repository_api.router)
    app.mount("/static", page.static_files(), name="static")
    served_routes = [route for router in routers for route in router.router.routes]
    app.add_middleware(CapacityFirst, service=services.service, routes=served_routes)  # innermost
    access = services.access or Access(settings, services.metrics)
    if access.enabled or access.default_limit is not None:
        app.add_middleware(AccessControl, access=access)
    # around access control, so that a 401, 403 or 429 sent before the body also closes its connection
    app.add_middleware(RequestBody, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=[*EXPOSED_HEADERS, "WWW-Authenticate", "RateLimit", "RateLimit-Policy"],
        )
    if crowded is not None:
        app.add_middleware(Rebalance, crowded=crowded, counter=services.metrics.rebalanced)
    app.add_middleware(RequestMetrics, services=services)
    app.add_middleware(RequestId)  # outermost: every answer carries its id
    return app
