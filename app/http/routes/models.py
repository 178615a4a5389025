"""GET /models and /models/{name}: what is served, on which provider, with which plan, and how
well it scored."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.http.deps import ModelPath, services
from app.http.schemas import ErrorBody
from app.serving.schemas import ModelInfo, ModelList

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, summary="Every model folder: served or refused, and why")
async def list_models(request: Request) -> ModelList:
    return services(request).service.catalogue()


@router.get("/models/{name}", response_model=ModelInfo, responses={404: {"model": ErrorBody}})
async def get_model(request: Request, name: ModelPath) -> ModelInfo:
    return services(request).service.describe(name)
