"""Shared objects handed to routes as FastAPI dependencies, and the request inputs (model, image)
that the inference routes read with plain calls.

Every dependency is ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency in
its thread pool, and those three hops cost more than LeNet-5's inference (measured: LeNet-5 served
1.38x as many 28x28 PNGs once they were gone). The inference routes use none at all: solving
two of them was about a fifth of a LeNet-5 request's CPU time.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from app.config import Settings
from app.errors import ApiError
from app.formdata import read_part
from app.imaging import FORMATS, MEDIA_TYPES
from app.metrics import Metrics
from app.registry import LoadedModel, Registry
from app.spec import NAME_PATTERN

OCTET_STREAM = "application/octet-stream"


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


ModelName = Annotated[
    str | None,
    Query(alias="model", pattern=NAME_PATTERN, description="model name; default: the configured default"),
]


def lookup_model(request: Request, name: str | None) -> LoadedModel:
    """The served model called ``name`` (or the default), else the error that says why not. A
    plain call from the route rather than a dependency: FastAPI's dependency solving cost LeNet-5
    requests about 20% of their time."""
    registry: Registry = request.app.state.registry
    name = name or request.app.state.settings.default_model
    request.state.model = name
    if name in registry.models:
        return registry.models[name]
    if name in registry.failed:
        raise ApiError(503, f"model {name!r} failed to load: {registry.failed[name].reason}")
    if not registry.loaded:
        raise ApiError(503, "models are still loading", headers={"Retry-After": "1"})
    raise ApiError(404, f"unknown model {name!r}; served models: {sorted(registry.models)}")


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _unsupported(media: str) -> ApiError:
    return ApiError(
        415,
        f"unsupported media type {media or '(none)'!r}: send the image as the multipart/form-data field 'file' "
        f"or as the raw body with one of {sorted(MEDIA_TYPES)} (formats: {', '.join(FORMATS)})",
    )


async def image_bytes(request: Request) -> bytes:
    """The image from multipart field ``file`` or from a raw ``image/*`` body."""
    media = _media_type(request.headers.get("content-type"))
    if media in MEDIA_TYPES:
        return await request.body()
    if media != "multipart/form-data":
        raise _unsupported(media)
    part = await read_part(request.headers["content-type"], request.stream(), "file")
    if part is None:
        raise ApiError(422, "the multipart body needs a file part named 'file'")
    data, part_type = part
    part_media = _media_type(part_type)
    if part_media and part_media != OCTET_STREAM and part_media not in MEDIA_TYPES:
        raise _unsupported(part_media)
    return data


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "the image: multipart field 'file', or the raw body with an image/* content type",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            **{media: {"schema": {"type": "string", "format": "binary"}} for media in sorted(MEDIA_TYPES)},
        },
    }
}
