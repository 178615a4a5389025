"""The Open Inference Protocol (KServe V2) endpoints, answering as Triton does: health, server and
model metadata, readiness, and inference on preprocessed tensors through the same dynamic batcher
as /classify. Each model has one version, "1"."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from app.batching import DeadlineExceeded, Overloaded
from app.deps import RegistryDep, SettingsDep
from app.disconnect import unless_disconnected
from app.registry import LoadedModel, Registry
from app.routes.health import is_ready
from app.v2 import (
    HEADER_LENGTH,
    ORT_DATATYPES,
    V2Error,
    class_count,
    classification,
    encode_output,
    encode_response,
    input_tensor,
    parse_request,
)

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

VERSION = "1"
MAX_BATCH = 64
EXTENSIONS = ["classification", "binary_tensor_data"]


def served(registry: Registry, name: str, version: str | None, request: Request | None = None) -> LoadedModel:
    if request is not None:
        request.state.model = name
    if version not in (None, VERSION):
        raise V2Error(404, f"model {name!r} has only version {VERSION}, not {version!r}")
    if name in registry.models:
        return registry.models[name]
    if name in registry.failed:
        raise V2Error(503, f"model {name!r} failed to load: {registry.failed[name].reason}")
    if not registry.loaded:
        raise V2Error(503, "models are still loading", {"Retry-After": "1"})
    raise V2Error(404, f"unknown model {name!r}; served models: {sorted(registry.models)}")


def tensor_shape(shape: list[Any]) -> list[int]:
    """ONNX symbolic dimensions (the batch) become -1, as in Triton's metadata."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def metadata(model: LoadedModel) -> dict[str, Any]:
    def describe(node) -> dict[str, Any]:
        return {
            "name": node.name,
            "datatype": ORT_DATATYPES.get(node.type, node.type),
            "shape": tensor_shape(node.shape),
        }

    outputs = [o for o in model.session.get_outputs() if o.name == model.spec.output.name]
    return {
        "name": model.name,
        "versions": [VERSION],
        "platform": "onnxruntime_onnx",
        "inputs": [describe(i) for i in model.session.get_inputs()],
        "outputs": [describe(o) for o in outputs],
    }


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "cnnserve", "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", summary="The server is alive")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", summary="The server is ready for inference")
async def ready(request: Request, registry: RegistryDep, settings: SettingsDep) -> Response:
    return Response(status_code=200 if is_ready(registry, settings, request.app.state.draining) else 503)


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", summary="Model metadata for a version")
async def model_metadata(registry: RegistryDep, name: str, version: str | None = None) -> dict[str, Any]:
    return metadata(served(registry, name, version))


@router.get("/models/{name}/config", summary="Model configuration, Triton style")
async def model_config(registry: RegistryDep, settings: SettingsDep, name: str) -> dict[str, Any]:
    model = served(registry, name, None)
    described = metadata(model)
    dims = {"input": described["inputs"], "output": described["outputs"]}
    return {
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": MAX_BATCH,
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(settings.max_queue_delay_ms * 1000),
            "preferred_batch_size": [settings.max_batch_size],
        },
        **{
            key: [{"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": t["shape"][1:]} for t in tensors]
            for key, tensors in dims.items()
        },
    }


@router.get("/models/{name}/ready", summary="The model is ready")
@router.get("/models/{name}/versions/{version}/ready", summary="The model version is ready")
async def model_ready(registry: RegistryDep, name: str, version: str | None = None) -> Response:
    served(registry, name, version)
    return Response(status_code=200)


@router.post("/models/{name}/infer", summary="Inference on tensors (JSON or binary-data extension)")
@router.post("/models/{name}/versions/{version}/infer", summary="Inference on a model version")
async def infer(request: Request, registry: RegistryDep, name: str, version: str | None = None) -> Response:
    model = served(registry, name, version, request)
    parsed, binary = parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
    batch = model_input(model, parsed.inputs, binary)
    try:
        output = await unless_disconnected(request, model.infer(batch))
    except Overloaded as error:
        raise V2Error(429, str(error), {"Retry-After": str(error.retry_after)}) from None
    except DeadlineExceeded as error:
        raise V2Error(503, str(error), {"Retry-After": "1"}) from None
    body, headers, media_type = respond(model, parsed, output)
    return Response(body, media_type=media_type, headers=headers)


def model_input(model: LoadedModel, inputs, binary: bytes) -> np.ndarray:
    (expected,) = model.session.get_inputs()
    if [t.name for t in inputs] != [expected.name]:
        raise V2Error(400, f"model {model.name!r} takes one input named {expected.name!r}")
    batch, _ = input_tensor(inputs[0], binary, 0, tuple(tensor_shape(expected.shape)))
    if not 1 <= len(batch) <= MAX_BATCH:
        raise V2Error(400, f"batch size must be 1 to {MAX_BATCH}, got {len(batch)}")
    return np.ascontiguousarray(batch)


def respond(model: LoadedModel, parsed, output: np.ndarray) -> tuple[bytes, dict[str, str], str]:
    everything_binary = bool(parsed.parameters.get("binary_data_output", False))
    wanted = parsed.outputs or [None]
    entries, tails = [], []
    for requested in wanted:
        parameters = requested.parameters if requested else {}
        if requested is not None and requested.name != model.spec.output.name:
            raise V2Error(400, f"model {model.name!r} has one output, {model.spec.output.name!r}")
        k = class_count(parameters)
        values = classification(output, k, model.spec.labels) if k > 0 else output
        entry, tail = encode_output(model.spec.output.name, values, parameters.get("binary_data", everything_binary))
        entries.append(entry)
        tails.append(tail)
    header = {"model_name": model.name, "model_version": VERSION, "outputs": entries}
    if parsed.id is not None:
        header["id"] = parsed.id
    return encode_response(header, tails)
