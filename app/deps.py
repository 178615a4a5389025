"""Shared objects and request inputs handed to routes as FastAPI dependencies.

Every dependency is ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency in
its thread pool, and those three hops cost more than LeNet-5's inference (measured: LeNet-5 served
1.38x as many 28x28 PNGs once they were gone).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from app.config import Settings
from app.errors import ApiError
from app.imaging import FORMATS, MEDIA_TYPES
from app.metrics import Metrics
from app.registry import LoadedModel, Registry
from app.spec import NAME_PATTERN

MULTIPART_MAX_FIELDS = 8
MULTIPART_MAX_FIELD_BYTES = 64 * 1024  # for text fields; the file part is bounded by the body limit
OCTET_STREAM = "application/octet-stream"


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def resolve_model(
    request: Request,
    model: Annotated[
        str | None, Query(pattern=NAME_PATTERN, description="model name; default: the configured default")
    ] = None,
) -> LoadedModel:
    """Reads the registry and settings from the app itself rather than through two more
    dependencies: FastAPI's per-request dependency solving is a cost on the hot path."""
    registry: Registry = request.app.state.registry
    name = model or request.app.state.settings.default_model
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
    form_limits = {"max_files": 1, "max_fields": MULTIPART_MAX_FIELDS, "max_part_size": MULTIPART_MAX_FIELD_BYTES}
    async with request.form(**form_limits) as form:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "the multipart body needs a file part named 'file'")
        part_media = _media_type(upload.content_type)
        if part_media and part_media != OCTET_STREAM and part_media not in MEDIA_TYPES:
            raise _unsupported(part_media)
        return await upload.read()


ModelDep = Annotated[LoadedModel, Depends(resolve_model)]
ImageDep = Annotated[bytes, Depends(image_bytes)]
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
