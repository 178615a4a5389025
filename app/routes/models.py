"""GET /models and /models/{name}: what is served, on which provider, and how well it scored."""

from __future__ import annotations

from fastapi import APIRouter, Path

from app.deps import RegistryDep, SettingsDep
from app.errors import not_found
from app.registry import FailedModel, LoadedModel
from app.schemas import ErrorBody, ModelInfo, ModelList
from app.spec import NAME_PATTERN

router = APIRouter(tags=["models"])


def describe(model: LoadedModel | FailedModel, default_model: str) -> ModelInfo:
    if isinstance(model, FailedModel):
        return ModelInfo(name=model.name, status="failed", reason=model.reason, default=model.name == default_model)
    spec = model.spec
    return ModelInfo(
        name=spec.name,
        status="ready",
        description=spec.description,
        input=spec.input,
        labels=len(spec.labels),
        provider=model.providers[0],
        providers=model.providers,
        accuracy=spec.accuracy,
        source=spec.source,
        sha256=spec.sha256,
        load_seconds=round(model.load_seconds, 3),
        default=spec.name == default_model,
        layers=len(model.analysis.layers) if model.featuremaps else 0,
        cam=model.featuremaps is not None and model.analysis.cam is not None,
    )


@router.get("/models", response_model=ModelList, summary="Every model folder: served or refused, and why")
async def list_models(registry: RegistryDep, settings: SettingsDep) -> ModelList:
    entries = {**registry.failed, **registry.models}
    return ModelList(
        default_model=settings.default_model,
        models=[describe(entries[name], settings.default_model) for name in sorted(entries)],
    )


@router.get("/models/{name}", response_model=ModelInfo, responses={404: {"model": ErrorBody}})
async def get_model(registry: RegistryDep, settings: SettingsDep, name: str = Path(pattern=NAME_PATTERN)) -> ModelInfo:
    model = registry.models.get(name) or registry.failed.get(name)
    if model is None:
        raise not_found(f"unknown model {name!r}; served models: {sorted(registry.models)}")
    return describe(model, settings.default_model)
