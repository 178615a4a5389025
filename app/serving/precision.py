"""FP16 per model (model.json ``"serving": {"precision": "fp16"}``): the graph converted at load, then
checked against FP32 on the model's sample inputs before it may serve.

The conversion is onnxruntime's own (``onnxruntime.transformers.float16``, shipped in the onnxruntime
wheel, so nothing more to install), keeping float32 inputs and outputs: the batch the service
builds and the logits it reads stay as they are. Half precision moves logits; a model that loses
its top-1 on a sample, or whose logits move by more than FP16_TOLERANCE of their FP32 spread, is
refused with the figures, instead of serving different answers than its FP32 self.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from app.serving import preprocess
from app.serving.spec import InputSpec

FP16_TOLERANCE = 0.01  # largest logit change allowed, as a share of the FP32 logits' spread (max - min)
SAMPLE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SYNTHETIC_SAMPLES = 4  # images made when the model folder has no samples/
SAMPLE_SEED = 20261202

Run = Callable[[np.ndarray], np.ndarray]


class PrecisionRefused(Exception):
    """The converted model answers differently from the original beyond what is allowed."""


def to_fp16(proto: onnx.ModelProto) -> bytes:
    """The model with float16 weights and arithmetic and float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.ModelProto.FromString(proto.SerializeToString()), keep_io_types=True)
    return converted.SerializeToString()  # type: ignore[no-any-return]


def samples(folder: Path, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """The model's sample inputs, as served: the images in its folder's ``samples/`` if it has
    them (real photos test FP16 best), else a few seeded synthetic ones (smooth noise, which has
    the spread of pixel values a photo has)."""
    found = sorted(p for p in (folder / "samples").glob("*") if p.suffix.lower() in SAMPLE_SUFFIXES)
    images = [p.read_bytes() for p in found] or synthetic_images()
    return np.concatenate([preprocess.prepare(data, spec, max_pixels) for data in images])


def synthetic_images() -> list[bytes]:
    """SYNTHETIC_SAMPLES PNGs of low-frequency colour noise, the same every time."""
    rng = np.random.default_rng(SAMPLE_SEED)
    images = []
    for _ in range(SYNTHETIC_SAMPLES):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(coarse).resize((256, 256), Image.Resampling.BICUBIC).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def check(fp32: Run, fp16: Run, inputs: np.ndarray) -> float:
    """Raises PrecisionRefused unless ``fp16`` gives every input the top-1 of ``fp32`` and logits
    within FP16_TOLERANCE of the FP32 spread; returns the largest change, as that share."""
    expected, got = fp32(inputs), fp16(inputs)
    spread = max(float(expected.max() - expected.min()), 1e-6)
    change = float(np.abs(expected - got).max()) / spread
    flipped = int((expected.argmax(axis=1) != got.argmax(axis=1)).sum())
    if flipped:
        raise PrecisionRefused(f"fp16 changes the top-1 of {flipped} of {len(inputs)} sample input(s)")
    if change > FP16_TOLERANCE:
        raise PrecisionRefused(
            f"fp16 moves a logit by {change:.2%} of the FP32 spread (allowed {FP16_TOLERANCE:.0%}) on the samples"
        )
    return change
