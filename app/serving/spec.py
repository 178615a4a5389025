"""model.json: what the service needs to serve a model without guessing.

This pydantic model is the one definition of the format; ``models/model.schema.json`` is generated
from it (``python -m app.serving.spec``) for the training side and for people writing model.json by hand.
"""

from __future__ import annotations

import itertools
import json
from functools import cached_property
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DigitSpec(Strict):
    """A photographed or drawn digit made into what an MNIST-style network was trained on, in
    place of the resize and crop: ink made white on black (``invert``: ``auto`` when most of the
    picture is light, or always, or never), levelled, cropped to its bounding box, scaled so its
    longer side is ``box`` pixels, then centred by its centre of mass in a ``field`` x ``field``
    square, as MNIST was made."""

    invert: Literal["auto"] | bool = Field(default="auto", description="make dark ink on light paper white on black")
    box: int = Field(default=20, gt=0, le=4096, description="the ink's longer side, in pixels")
    field: int = Field(default=28, gt=0, le=4096, description="the square the digit is centred in")
    centre: Literal["mass"] = Field(default="mass", description="what is put at the field's centre")


class InputSpec(Strict):
    """How an image becomes the input tensor. Pixels are on the 0..255 scale before mean and std."""

    name: str = Field(description="ONNX input tensor name")
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["L", "RGB", "BGR"] = Field(description="channel order the model was trained on")
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    resize: int | None = Field(
        default=None,
        gt=0,
        description="shorter side is resized to this before the centre crop to height x width; "
        "null resizes straight to height x width",
    )
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    mean: list[float] = Field(description="per channel, on the 0..255 pixel scale")
    std: list[float] = Field(description="per channel, on the 0..255 pixel scale")
    digit: DigitSpec | None = Field(
        default=None, description="handwritten-digit normalisation instead of resize and crop (gray, square input)"
    )

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> InputSpec:
        channels = 1 if self.color == "L" else 3
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} value(s) for colour mode {self.color}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.resize is not None and self.resize < min(self.height, self.width):
            raise ValueError("resize must be at least the crop size")
        if self.digit is not None:
            self._digit_fits(self.digit)
        return self

    def _digit_fits(self, digit: DigitSpec) -> None:
        if self.color != "L" or self.resize is not None:
            raise ValueError("digit needs colour mode L and no resize (it replaces resize and crop)")
        if not self.height == self.width == digit.field:
            raise ValueError(f"digit.field {digit.field} must equal height and width ({self.height}x{self.width})")
        if digit.box > digit.field:
            raise ValueError(f"digit.box {digit.box} must fit in digit.field {digit.field}")

    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3

    @cached_property
    def scale_offset(self) -> tuple[np.ndarray, np.ndarray]:
        """(pixel * scale + offset) = (pixel - mean) / std per channel, shaped to broadcast over the
        layout's pixels; computed once, as every request needs it."""
        scale = 1.0 / np.asarray(self.std, dtype=np.float32)
        offset = -np.asarray(self.mean, dtype=np.float32) * scale
        if self.layout == "NCHW":
            return scale[:, None, None], offset[:, None, None]
        return scale, offset


class OutputSpec(Strict):
    name: str = Field(description="ONNX output tensor name")
    kind: Literal["logits", "probabilities"]


class Source(Strict):
    architecture: str
    dataset: str
    command: str | None = Field(default=None, description="the command that reproduces the model")
    pretrained: str | None = Field(default=None, description="where pretrained weights came from")
    framework: str | None = None


class Accuracy(Strict):
    dataset: str
    split: str
    samples: int = Field(gt=0)
    top1: float = Field(ge=0, le=1)
    top5: float = Field(ge=0, le=1)
    measured_with: str = Field(description="what ran the measurement, e.g. onnxruntime 1.32.0 on the exported file")


POLICY_KINDS: dict[str, dict[str, Any]] = {
    "latest": {"type": "integer"},
    "all": {"const": True},
    "specific": {"type": "array"},
}
POLICY_OF_ONE_KIND: dict[str, Any] = {
    "not": {
        "anyOf": [
            {"required": [a, b], "properties": {a: POLICY_KINDS[a], b: POLICY_KINDS[b]}}
            for a, b in itertools.combinations(POLICY_KINDS, 2)
        ]
    }
}
"""VersionPolicy._one_kind for the JSON Schema: no two of a number, true and a list."""


class VersionPolicy(Strict):
    """Which numbered versions of a model are served, as Triton's version_policy: the newest N
    (``latest``, the default with N = 1), ``all``, or a ``specific`` list. A model kept flat (its
    model.onnx beside model.json) has the one version 1."""

    model_config = ConfigDict(json_schema_extra=POLICY_OF_ONE_KIND)

    latest: int | None = Field(default=None, ge=1, description="serve the newest N versions")
    all: bool = Field(default=False, description="serve every version")
    specific: list[int] | None = Field(default=None, min_length=1, description="serve these versions")

    @model_validator(mode="after")
    def _one_kind(self) -> VersionPolicy:
        if sum((self.latest is not None, self.all, self.specific is not None)) > 1:
            raise ValueError("version_policy takes one of latest, all, specific")
        return self

    def choose(self, versions: list[int]) -> list[int]:
        """The versions to serve out of those on disk, newest first."""
        newest_first = sorted(versions, reverse=True)
        if self.all:
            return newest_first
        if self.specific is not None:
            return [v for v in newest_first if v in self.specific]
        return newest_first[: self.latest or 1]


class ServingOverrides(Strict):
    """This model's serving settings, over the CNNSERVE_* ones (unset: the global value)."""

    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    max_queue_delay_ms: float | None = Field(default=None, ge=0, le=10_000)
    max_queue: int | None = Field(default=None, ge=1)
    inference_workers: int | None = Field(default=None, ge=0, le=64)
    intra_op_threads: int | None = Field(default=None, ge=0)
    precision: Literal["fp32", "fp16"] | None = Field(
        default=None,
        description="on an accelerator: fp16 converts the model at load, refused unless it keeps every sample's "
        "top-1 and its logits within 1% of their fp32 spread",
    )

    def given(self) -> dict[str, Any]:
        return {key: value for key, value in self.model_dump().items() if value is not None}


class ModelSpec(Strict):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    input: InputSpec
    output: OutputSpec
    labels: list[str] = Field(min_length=1)
    source: Source
    accuracy: Accuracy | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of model.onnx")
    version_policy: VersionPolicy = Field(
        default_factory=VersionPolicy,
        description="which numbered version folders are served; read from the newest version's model.json",
    )
    serving: ServingOverrides = Field(
        default_factory=ServingOverrides, description="serving settings for this model, over the global ones"
    )


def json_schema() -> dict[str, Any]:
    schema = ModelSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "cnnserve model.json"
    return schema


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
