"""The Open Inference Protocol's model repository extension, answering as Triton does, so that
tritonclient's ``get_model_repository_index``, ``load_model`` and ``unload_model`` work unchanged.
Included only when CNNSERVE_MODEL_CONTROL is ``explicit`` or ``poll``: with ``none`` these paths
are unknown (404), like any other.

A model is loaded from its folder in the repository, by name, and from nowhere else: Triton's
load parameters that carry a configuration or model files (``config``, ``file:...``) are refused,
as is any name that is not one path segment of a model name's characters. The name is taken as
the rest of the path (``{name:path}``), so that ``..`` or an encoded ``/`` reaches the repository's
check and is answered 400, rather than slipping past a route pattern.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any

from fastapi import APIRouter, Request, Response

from app.http.deps import services
from app.http.inputs import read_body
from app.serving.errors import BadRequest, NotFound
from app.serving.repository import IndexEntry
from app.serving.spec import NAME_PATTERN

router = APIRouter(prefix="/v2/repository", tags=["open inference protocol (v2): model repository"])

UPLOAD_PARAMETER = "config"
UPLOAD_PREFIX = "file:"


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; an empty body is an empty object (tritonclient sends an empty
    body for the index, Triton accepts one everywhere)."""
    body = await read_body(request)
    if not body.strip():
        return {}
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"the body is not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise BadRequest("the body must be a JSON object")
    return parsed


def parameters_of(body: dict[str, Any]) -> dict[str, Any]:
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be a JSON object")
    return parameters


def refuse_load_parameters(parameters: dict[str, Any]) -> None:
    """Triton lets a load carry a model configuration and model files; here a model comes only
    from its folder in the repository, whose files an operator put there (and whose sha256 the
    loader checks): anything sent over the API is refused, never written or read. Any other
    parameter is refused too, as Triton refuses one it does not know."""
    uploads = sorted(key for key in parameters if key == UPLOAD_PARAMETER or key.startswith(UPLOAD_PREFIX))
    if uploads:
        raise BadRequest(
            f"load parameters {uploads} refused: cnnserve never accepts a model configuration or model files "
            "over the API; put the model folder into the repository and load it by name"
        )
    if parameters:
        raise BadRequest(f"unrecognized load parameters {sorted(parameters)}")


def check_name(name: str) -> None:
    """A name that could not be a model folder (``..``, ``a/b``) is refused before anything is looked up."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise BadRequest(f"{name!r} is not a model name (letters, digits, '_', '.', '-'; no '/')")


def row(entry: IndexEntry) -> dict[str, str]:
    """Triton's index row: the name always, version and reason only when there is one."""
    fields = {"name": entry.name, "version": entry.version, "state": entry.state, "reason": entry.reason}
    return {key: value for key, value in fields.items() if value or key in ("name", "state")}


@router.post("/index", summary="Every model in the repository and its versions: READY, UNAVAILABLE or UNLOADED")
async def index(request: Request) -> list[dict[str, str]]:
    ready_only = (await json_object(request)).get("ready", False)
    if not isinstance(ready_only, bool):
        raise BadRequest("'ready' must be true or false")
    entries = await asyncio.to_thread(services(request).repository.index)  # it lists the folder
    return [row(entry) for entry in entries if entry.state == "READY" or not ready_only]


@router.post("/models/{name:path}/load", summary="Load or reload a model from its folder in the repository")
async def load(request: Request, name: str) -> Response:
    """200 with an empty body once every server process serves it; 400 with the reason if nothing
    new could be loaded (what served before goes on serving); 404 for a folder that is not there."""
    refuse_load_parameters(parameters_of(await json_object(request)))
    await services(request).control.load(name)
    return Response(status_code=200)


@router.post("/models/{name:path}/unload", summary="Stop serving a model")
async def unload(request: Request, name: str) -> Response:
    """200 with an empty body, also for a model that is not loaded, as Triton answers (unloading
    leaves it unloaded either way); 400 for a name that is no model name. ``unload_dependents``
    is accepted and means nothing: no model here depends on another."""
    parameters_of(await json_object(request))
    check_name(name)
    with contextlib.suppress(NotFound):
        await services(request).control.unload(name)
    return Response(status_code=200)
