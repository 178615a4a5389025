"""Tensors in and out of the Open Inference Protocol's gRPC messages: typed contents or
``raw_input_contents`` in, ``raw_output_contents`` out (as Triton answers, and as tritonclient reads
them), with the classification extension. The wire format only: the service checks the tensors
against the model."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from app.grpc import inference_pb2 as pb
from app.http import v2_codec
from app.serving import postprocess
from app.serving.errors import BadRequest
from app.serving.schemas import Tensor
from app.serving.service import Inference, Signature

FLOAT = np.dtype("<f4")
DATATYPES = {"FP32": FLOAT}
INLINE_VALUES = 16 * 1024  # typed values converted on the event loop; more go to a thread (about 1 ms)
CLASSIFICATION = "classification"


def input_tensors(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input by name; raw contents, when given, pair with the inputs in order."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    if not request.inputs:
        raise BadRequest("the request has no inputs")
    tensors: dict[str, np.ndarray] = {}
    for position, tensor in enumerate(request.inputs):
        if tensor.name in tensors:
            raise BadRequest(f"input {tensor.name!r} is given twice")
        tensors[tensor.name] = input_tensor(tensor, raw[position] if raw else None)
    return tensors


def input_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    """One input as an array of its declared shape."""
    if tensor.datatype not in DATATYPES:
        raise BadRequest(f"input {tensor.name!r} must be one of {sorted(DATATYPES)}, got {tensor.datatype!r}")
    shape = tuple(tensor.shape)
    if not shape or any(d <= 0 for d in shape):
        raise BadRequest(f"input {tensor.name!r} has shape {list(shape)}: every dimension must be positive")
    count = math.prod(shape)
    if raw is not None:
        if tensor.HasField("contents"):
            raise BadRequest(f"input {tensor.name!r} has both contents and raw_input_contents")
        if len(raw) != count * FLOAT.itemsize:
            raise BadRequest(f"input {tensor.name!r}: {len(raw)} raw bytes for shape {list(shape)} of FP32")
        return np.frombuffer(raw, FLOAT).reshape(shape)
    values = tensor.contents.fp32_contents
    if len(values) != count:
        raise BadRequest(f"input {tensor.name!r}: {len(values)} fp32_contents for shape {list(shape)}")
    return np.asarray(values, dtype=np.float32).reshape(shape)


def costly(request: pb.ModelInferRequest) -> bool:
    """Whether converting the typed values would hold the event loop too long."""
    return sum(len(tensor.contents.fp32_contents) for tensor in request.inputs) > INLINE_VALUES


def class_count(parameters: Mapping[str, pb.InferParameter]) -> int:
    """The classification extension's k; 0 when the client asked for the raw tensor."""
    if CLASSIFICATION not in parameters:
        return 0
    parameter = parameters[CLASSIFICATION]
    kind = parameter.WhichOneof("parameter_choice")
    k = getattr(parameter, kind) if kind in ("int64_param", "uint64_param") else None
    if not isinstance(k, int) or k < 0:
        raise BadRequest(f"the classification parameter must be a whole number of classes, got {parameter}")
    return k


def response(result: Inference, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """The outputs asked for (the one output when none was), each as raw bytes."""
    answer = pb.ModelInferResponse(model_name=result.model, model_version=result.version, id=request.id)
    wanted: list[pb.ModelInferRequest.InferRequestedOutputTensor | None] = [*request.outputs] or [None]
    for requested in wanted:
        if requested is not None and requested.name != result.output:
            raise BadRequest(f"model {result.model!r} has one output, {result.output!r}")
        k = class_count(requested.parameters) if requested is not None else 0
        values = postprocess.classification(result.values, k, result.labels) if k > 0 else result.values
        entry, raw = v2_codec.encode_output(result.output, values, binary=True)
        answer.outputs.add(name=result.output, datatype=entry["datatype"], shape=entry["shape"])
        answer.raw_output_contents.append(raw)
    return answer


def tensor_metadata(tensor: Tensor) -> pb.ModelMetadataResponse.TensorMetadata:
    datatype = v2_codec.ORT_DATATYPES.get(tensor.element_type, tensor.element_type)
    return pb.ModelMetadataResponse.TensorMetadata(name=tensor.name, datatype=datatype, shape=list(tensor.shape))


def metadata(signature: Signature, platform: str) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=signature.name,
        versions=signature.versions,
        platform=platform,
        inputs=[tensor_metadata(signature.input)],
        outputs=[tensor_metadata(signature.output)],
    )
