"""A model as an accelerator runs it: fixed batch shapes with bound buffers (app/serving/runtime.py,
``ShapedRunner``), FP16 where model.json asks (app/serving/precision.py), TensorRT where this
onnxruntime offers it, every shape warmed before the model is served.

Used by the inference owner of the shared feed (app/serving/owner.py) and by a server process
that holds a CUDA session of its own (``CNNSERVE_FEED=per-process``). On the CPU provider (the
test suite, a feed without a GPU) the shapes share one session: the CPU has no per-shape set-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from app import sizing
from app.config import Settings
from app.serving import precision
from app.serving.runtime import (
    CPU,
    TENSORRT,
    ProviderUnavailable,
    ShapedRunner,
    accelerator_providers,
    session_on,
    tensorrt_status,
)
from app.serving.spec import ModelSpec

log = logging.getLogger("cnnserve.accelerated")


@dataclass(frozen=True)
class Shaped:
    """A model ready to run at its batch shapes, and what it got."""

    runner: ShapedRunner
    provider: str
    precision: str
    fp16_change: float  # the largest logit change FP16 made on the samples, as a share of the spread

    def describe(self) -> str:
        change = f" (logits within {self.fp16_change:.2%} of FP32 on the samples)" if self.precision == "fp16" else ""
        shapes = "/".join(map(str, self.runner.shapes))
        return f"batch shapes {shapes} on {self.provider}, {self.precision}{change}, I/O bound"


class Refused(Exception):
    """The model cannot run here as asked, with the reason (the loader refuses it with that)."""


def build(proto: onnx.ModelProto, folder: Path, spec: ModelSpec, settings: Settings, device_id: int = 0) -> Shaped:
    """``spec``'s verified model (external data already read in), on the accelerator ``settings``
    prefer (device ``device_id``), the FP16 check against samples from ``folder``; raises Refused."""
    fp16 = settings.precision == "fp16"
    original = proto.SerializeToString()
    try:
        providers = accelerator_providers(settings.providers, device_id, tensorrt_cache(settings, spec), fp16)
    except ProviderUnavailable as error:
        raise Refused(str(error)) from None
    shapes = settings.batch_shape_list
    sessions = sessions_for(precision.to_fp16(proto) if fp16 else original, providers, shapes)
    first = sessions[shapes[0]]
    names = (spec.input.name, spec.output.name)
    runner = ShapedRunner(sessions, names, (*row_shape(spec), len(spec.labels)))
    change = check_fp16(folder, spec, settings, runner, session_on(original, providers, 1)) if fp16 else 0.0
    runner.warm()
    provider = first.get_providers()[0]
    if providers[0] != CPU and provider != TENSORRT:
        asked = providers[0][0] == TENSORRT
        status = "asked for, but the session fell back to CUDA" if asked else tensorrt_status()
        log.info("model %s: TensorRT %s", spec.name, status)
    return Shaped(runner, provider, settings.precision, change)


def sessions_for(
    model: bytes, providers: list[str | tuple[str, dict[str, str]]], shapes: tuple[int, ...]
) -> dict[int, ort.InferenceSession]:
    """A session per batch shape on an accelerator (each keeps its one shape's cuDNN set-up); one
    session for all of them on the CPU, with every CPU's threads (the owner is alone there)."""
    try:
        if providers[0] == CPU:
            one = session_on(model, providers, sizing.available_cpus())
            return dict.fromkeys(shapes, one)
        return {size: session_on(model, providers, 1) for size in shapes}
    except Exception as error:  # ONNX Runtime raises several unrelated types for a bad file
        raise Refused(f"ONNX Runtime cannot load model.onnx: {error}") from error


def row_shape(spec: ModelSpec) -> tuple[int, int, int]:
    """One image's input tensor, without the batch."""
    given = spec.input
    if given.layout == "NCHW":
        return (given.channels, given.height, given.width)
    return (given.height, given.width, given.channels)


def tensorrt_cache(settings: Settings, spec: ModelSpec) -> Path | None:
    """Where TensorRT keeps this model's engines, or None to leave TensorRT out."""
    if not settings.tensorrt:
        return None
    return settings.tensorrt_cache / f"{spec.name}-{spec.sha256[:12]}-{settings.precision}"


def check_fp16(
    folder: Path, spec: ModelSpec, settings: Settings, runner: ShapedRunner, fp32: ort.InferenceSession
) -> float:
    """The FP16 runner against the FP32 model on the model's sample inputs (precision.check)."""
    inputs = precision.samples(folder, spec.input, settings.max_pixels)

    def original(batch: np.ndarray) -> np.ndarray:
        (out,) = fp32.run([spec.output.name], {spec.input.name: batch})
        return np.asarray(out)

    try:
        return precision.check(original, runner.run, inputs)
    except precision.PrecisionRefused as error:
        raise Refused(f"serving.precision fp16 refused: {error}") from None
