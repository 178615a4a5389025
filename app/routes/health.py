"""Probes and metrics. Liveness never depends on models; readiness means the default model is
loaded, hash-verified and warmed."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.config import Settings
from app.deps import MetricsDep, RegistryDep, SettingsDep
from app.registry import Registry
from app.schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="alive")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}}, summary="Ready for traffic")
async def readyz(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    draining = request.app.state.draining
    ready = is_ready(registry, settings, draining)
    body = Health(
        status="ready" if ready else readiness_problem(registry, draining),
        models_loaded=len(registry.models),
        models_failed=len(registry.failed),
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def is_ready(registry: Registry, settings: Settings, draining: bool) -> bool:
    """Loaded, the default model served, and not shutting down: what /readyz and the V2 probe mean."""
    return registry.loaded and settings.default_model in registry.models and not draining


def readiness_problem(registry, draining: bool) -> str:
    if draining:
        return "draining: shutting down"
    return "loading" if not registry.loaded else "default model unavailable"


@router.get("/metrics", summary="Prometheus text format", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
