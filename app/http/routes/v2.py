"""The Open Inference Protocol (KServe V2) endpoints, answering as Triton does: health, server and
model metadata, readiness, and inference on preprocessed tensors through the same service (and so
the same admission and batcher) as /classify."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from app.http import v2_codec
from app.http.deps import ModelPath, services
from app.http.inputs import disconnect, read_body
from app.serving import postprocess
from app.serving.errors import BadRequest
from app.serving.schemas import Tensor
from app.serving.service import Inference, Signature, Tensors

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

EXTENSIONS = ["classification", "binary_tensor_data"]
REPOSITORY_EXTENSION = "model_repository"  # app/http/routes/repository.py, when models are managed
PLATFORM = "onnxruntime_onnx"
INLINE_BODY_BYTES = 64 * 1024  # parsing more than this would hold the event loop over a millisecond


def describe(tensor: Tensor) -> dict[str, Any]:
    datatype = v2_codec.ORT_DATATYPES.get(tensor.element_type, tensor.element_type)
    return {"name": tensor.name, "datatype": datatype, "shape": list(tensor.shape)}


def metadata(signature: Signature) -> dict[str, Any]:
    return {
        "name": signature.name,
        "versions": signature.versions,
        "platform": PLATFORM,
        "inputs": [describe(signature.input)],
        "outputs": [describe(signature.output)],
    }


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    managed = services(request).control.managed
    extensions = [*EXTENSIONS, REPOSITORY_EXTENSION] if managed else EXTENSIONS
    return {"name": "cnnserve", "version": request.app.version, "extensions": extensions}


@router.get("/health/live", summary="The server is alive")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", summary="The server is ready for inference")
async def ready(request: Request) -> Response:
    return Response(status_code=200 if services(request).service.readiness().ready else 503)


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", summary="Model metadata for a version")
async def model_metadata(request: Request, name: ModelPath, version: str | None = None) -> dict[str, Any]:
    return metadata(services(request).service.signature(name, version))


@router.get("/models/{name}/config", summary="Model configuration, Triton style")
async def model_config(request: Request, name: ModelPath) -> dict[str, Any]:
    signature = services(request).service.signature(name)
    tensors = {"input": signature.input, "output": signature.output}
    return {
        "name": signature.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": signature.max_batch_size,
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(signature.max_queue_delay_ms * 1000),
            "preferred_batch_size": [signature.preferred_batch_size],
        },
        **{
            key: [{"name": t.name, "data_type": f"TYPE_{describe(t)['datatype']}", "dims": list(t.shape[1:])}]
            for key, t in tensors.items()
        },
    }


@router.get("/models/{name}/ready", summary="The model is ready")
@router.get("/models/{name}/versions/{version}/ready", summary="The model version is ready")
async def model_ready(request: Request, name: ModelPath, version: str | None = None) -> Response:
    services(request).service.model_ready(name, version)
    return Response(status_code=200)


@router.post("/models/{name}/infer", summary="Inference on tensors (JSON or binary-data extension)")
@router.post("/models/{name}/versions/{version}/infer", summary="Inference on a model version")
async def infer(request: Request, name: ModelPath, version: str | None = None) -> Response:
    service = services(request).service
    service.model_ready(name, version)
    parsed: list[v2_codec.InferRequest] = []

    async def tensors() -> Tensors:
        """Read once admitted; a big body (JSON numbers, mostly) is parsed off the event loop."""
        body, header_length = await read_body(request), request.headers.get(v2_codec.HEADER_LENGTH)
        decode = partial(v2_codec.decode, body, header_length)
        request_, inputs = decode() if len(body) <= INLINE_BODY_BYTES else await run_in_threadpool(decode)
        parsed.append(request_)
        return inputs

    result = await service.infer(name, tensors, version=version, gone=disconnect(request))
    body, headers, media_type = respond(result, parsed[0])
    return Response(body, media_type=media_type, headers=headers)


def respond(result: Inference, parsed: v2_codec.InferRequest) -> tuple[bytes, dict[str, str], str]:
    everything_binary = bool(parsed.parameters.get("binary_data_output", False))
    entries, tails = [], []
    wanted: Sequence[v2_codec.OutputRequest | None] = parsed.outputs or [None]
    for requested in wanted:
        parameters = requested.parameters if requested else {}
        if requested is not None and requested.name != result.output:
            raise BadRequest(f"model {result.model!r} has one output, {result.output!r}")
        k = v2_codec.class_count(parameters)
        values = postprocess.classification(result.values, k, result.labels) if k > 0 else result.values
        entry, tail = v2_codec.encode_output(result.output, values, parameters.get("binary_data", everything_binary))
        entries.append(entry)
        tails.append(tail)
    header: dict[str, Any] = {"model_name": result.model, "model_version": result.version, "outputs": entries}
    if parsed.id is not None:
        header["id"] = parsed.id
    return v2_codec.encode_response(header, tails)
