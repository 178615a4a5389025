"""The Open Inference Protocol (KServe V2) as Triton speaks it: tensors in JSON or in the
binary-data extension, and the classification extension, so that tritonclient and KServe tools work
unchanged. This module holds the wire format; ``app/http/routes/v2.py`` holds the endpoints, and the
service checks the tensors against the model.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from app.serving.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_MEDIA_TYPE = "application/octet-stream"
DATATYPES = {"FP32": np.dtype("<f4")}
ORT_DATATYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16", "tensor(uint8)": "UINT8"}


class TensorIn(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class OutputRequest(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorIn] = Field(min_length=1)
    outputs: list[OutputRequest] | None = None


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON header and the binary tail that follows it when the client used the extension."""
    split = len(body)
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < split <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} {split} does not fit a body of {len(body)} bytes")
    try:
        request = InferRequest.model_validate(json.loads(body[:split]))
    except (ValueError, ValidationError) as error:
        raise BadRequest(f"the inference request is not valid JSON of the V2 protocol: {error}") from None
    return request, body[split:]


def input_tensor(tensor: TensorIn, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One input as an array of its declared shape, and where the next binary tensor starts."""
    if tensor.datatype not in DATATYPES:
        raise BadRequest(f"input {tensor.name!r} must be one of {sorted(DATATYPES)}, got {tensor.datatype!r}")
    shape = tuple(tensor.shape)
    if not shape or any(d <= 0 for d in shape):
        raise BadRequest(f"input {tensor.name!r} has shape {list(shape)}: every dimension must be positive")
    dtype, count = DATATYPES[tensor.datatype], math.prod(shape)
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or offset + size > len(binary):
            raise BadRequest(f"input {tensor.name!r}: binary_data_size {size} does not match shape {list(shape)}")
        return np.frombuffer(binary, dtype, count, offset).reshape(shape).astype(np.float32), offset + size
    if tensor.data is None:
        raise BadRequest(f"input {tensor.name!r} has neither data nor binary_data_size")
    try:
        values = np.asarray(tensor.data, dtype=np.float32)
    except (ValueError, TypeError):
        raise BadRequest(f"input {tensor.name!r}: data must be numbers") from None
    if values.size != count:
        raise BadRequest(f"input {tensor.name!r}: {values.size} values for shape {list(shape)}")
    return values.reshape(shape), offset


def input_tensors(request: InferRequest, binary: bytes) -> dict[str, np.ndarray]:
    """Every input by name, the binary ones read from the tail in order."""
    tensors, offset = {}, 0
    for tensor in request.inputs:
        if tensor.name in tensors:
            raise BadRequest(f"input {tensor.name!r} is given twice")
        tensors[tensor.name], offset = input_tensor(tensor, binary, offset)
    return tensors


def decode(body: bytes, header_length: str | None) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """The request and its input tensors by name."""
    request, binary = parse_request(body, header_length)
    return request, input_tensors(request, binary)


def class_count(parameters: dict[str, Any]) -> int:
    """The classification extension's k; 0 when the client asked for the raw tensor."""
    k = parameters.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise BadRequest(f"the classification parameter must be a whole number of classes, got {k!r}")
    return k


def encode_output(name: str, values: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes]:
    """One output's JSON entry and, where the client asked for binary data, its bytes."""
    entry: dict[str, Any] = {"name": name, "shape": list(values.shape)}
    if values.dtype == object:
        entry["datatype"] = "BYTES"
        raw = b"".join(len(s.encode()).to_bytes(4, "little") + s.encode() for s in values.ravel())
    else:
        entry["datatype"] = "FP32"
        raw = values.astype("<f4").tobytes()
    if binary:
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    entry["data"] = values.ravel().tolist()
    return entry, b""


def encode_response(header: dict[str, Any], tails: list[bytes]) -> tuple[bytes, dict[str, str], str]:
    """Body, headers and media type: plain JSON, or JSON then the binary outputs in order."""
    text = json.dumps(header, separators=(",", ":")).encode()
    if not any(tails):
        return text, {}, "application/json"
    return text + b"".join(tails), {HEADER_LENGTH: str(len(text))}, BINARY_MEDIA_TYPE
