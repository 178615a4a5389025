"""The second session that shows what each layer sees.

Promoting a tensor to a graph output stops ONNX Runtime fusing its Conv with the activation after
it (a 12% slower /classify when measured), so /classify keeps the original session and this one,
with every layer's output promoted, is built the first time someone asks for a feature map.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from app.serving.inspect.graph import CamHead, Layer, find_cam_head, find_layers, predicted_size
from app.serving.runtime import create_session
from app.serving.spec import ModelSpec


@dataclass(frozen=True)
class Analysis:
    """What the graph offers, found once at load from the graph alone."""

    layers: list[Layer]
    cam: CamHead | None

    @classmethod
    def of(cls, model: onnx.ModelProto, spec: ModelSpec) -> Analysis:
        return cls(find_layers(model), find_cam_head(model, spec.output.name))

    def layer(self, name: str) -> Layer | None:
        return next((layer for layer in self.layers if layer.name == name), None)

    @property
    def default_layer(self) -> Layer | None:
        return next((layer for layer in self.layers if layer.stage == "convolution"), None) or next(
            iter(self.layers), None
        )


class FeatureMapSession:
    """One ONNX Runtime session whose outputs are the model's own plus every layer's tensor."""

    def __init__(
        self,
        model: onnx.ModelProto,
        spec: ModelSpec,
        analysis: Analysis,
        preference: str,
        threads: int,
    ) -> None:
        self.spec = spec
        self.analysis = analysis
        wanted = [layer.tensor for layer in analysis.layers]
        wanted += [layer.input_tensor for layer in analysis.layers if layer.kernel is not None]
        if analysis.cam is not None:
            wanted.append(analysis.cam.features)
        self.outputs = list(dict.fromkeys([spec.output.name, *wanted]))
        self.session = create_session(promote(model, self.outputs).SerializeToString(), preference, threads)
        self.shapes = self._probe()

    def _probe(self) -> dict[str, tuple[int, ...]]:
        """Shapes as ONNX Runtime really produces them, from one run on zeros."""
        i = self.spec.input
        dims = (1, i.channels, i.height, i.width) if i.layout == "NCHW" else (1, i.height, i.width, i.channels)
        values = self.session.run(self.outputs, {i.name: np.zeros(dims, np.float32)})
        return {name: tuple(int(d) for d in value.shape[1:]) for name, value in zip(self.outputs, values, strict=True)}

    def run(self, batch: np.ndarray, tensors: list[str]) -> list[np.ndarray]:
        return list(self.session.run(tensors, {self.spec.input.name: batch}))

    def predicted(self, layer: Layer) -> tuple[int, int] | None:
        shape = self.shapes.get(layer.input_tensor)
        return predicted_size(layer, shape[-2:]) if shape and len(shape) == 3 else None


def promote(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``tensors`` (types from shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    del augmented.graph.output[:]
    for name in tensors:
        entry = known.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        augmented.graph.output.append(entry)
    return augmented


class LazyFeatureMaps:
    """Builds the FeatureMapSession on first use, once, whichever thread asks first."""

    def __init__(self, load: Callable[[], FeatureMapSession]) -> None:
        self._load = load
        self._session: FeatureMapSession | None = None
        self._lock = threading.Lock()

    def get(self) -> FeatureMapSession:
        with self._lock:
            if self._session is None:
                self._session = self._load()
            return self._session

    @property
    def built(self) -> bool:
        return self._session is not None
