"""Probes and metrics. Liveness never depends on models; readiness is the service's to say."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.http.deps import services
from app.http.schemas import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="alive")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}}, summary="Ready for traffic")
async def readyz(request: Request) -> Response:
    readiness = services(request).service.readiness()
    body = Health(status=readiness.status, models_loaded=readiness.models_loaded, models_failed=readiness.models_failed)
    return JSONResponse(body.model_dump(), status_code=200 if readiness.ready else 503)


@router.get("/metrics", summary="Prometheus text format", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(services(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
