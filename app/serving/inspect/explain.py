"""Explanation methods on ONNX Runtime: Grad-CAM, Score-CAM, Ablation-CAM, EigenCAM and occlusion.

Each method is written once as a generator that yields the forward passes it needs (a batch of
images for the whole network, or a batch of a layer's values for the network's tail) and receives
their outputs, so the service can send those passes through the model's batcher (app/serving/
inspect/explain_run.py) while the evaluation in training/faithfulness.py runs them directly, and
both get the same maps. Conventions follow pytorch-grad-cam (jacobgil): Grad-CAM's weights are the
spatial means of the gradient of the class's output; Ablation-CAM's are the relative drop of that
output when a channel is zeroed; Score-CAM's the class's softmax probability on the image masked
by each channel's upsampled map (Wang et al., 2020); EigenCAM projects the activations on their
first principal component (class-independent). Occlusion slides a grey square (the dataset's mean,
zero after normalisation) and records how much the class's probability drops (Zeiler and Fergus).

Every map comes back as (height, width) over the model's input, in [0, 1].
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from app.serving.inspect import backprop
from app.serving.inspect.featuremaps import Analysis, FeatureMapSession, promote
from app.serving.inspect.graph import Layer
from app.serving.runtime import create_session
from app.serving.spec import InputSpec, ModelSpec

METHODS = ("gradcam", "scorecam", "ablationcam", "eigencam", "occlusion")
LAYER_METHODS = ("gradcam", "scorecam", "ablationcam", "eigencam")


@dataclass(frozen=True)
class Pass:
    """A batch of forward passes: images for the whole network, or (``tail``) a layer's values
    for the part of the network after ``layer``."""

    batch: np.ndarray | dict[str, np.ndarray]
    tail: str | None = None

    @property
    def size(self) -> int:
        first = self.batch if isinstance(self.batch, np.ndarray) else next(iter(self.batch.values()))
        return len(first)


Method = Generator[Pass, np.ndarray, np.ndarray]
"""Yields passes, receives each pass's output rows, returns the map at the layer's resolution."""


class Explainer:
    """A model's graph prepared for explanations, with a session whose outputs are every tensor
    (built on first use) and one session per layer for the network's tail (Ablation-CAM)."""

    def __init__(self, model: onnx.ModelProto, spec: ModelSpec, preference: str, threads: int) -> None:
        self.model = model
        self.spec = spec
        self.output = spec.output.name
        self.graph = backprop.Graph(model)
        self.preference, self.threads = preference, threads
        self._session: ort.InferenceSession | None = None
        self._names: list[str] = []
        self._tails: dict[str, Tail] = {}
        self._lock = threading.Lock()
        self._tensors = [o for node in model.graph.node for o in node.output if o and o not in self.graph.constants]

    def methods(self, tensor: str, shape: tuple[int, ...]) -> list[str]:
        """The layer-based methods that apply to the layer producing ``tensor`` (C, H, W)."""
        if len(shape) != 3 or tensor == self.output or not self.graph.path(tensor, self.output):
            return []
        found = ["scorecam", "ablationcam", "eigencam"]
        return ["gradcam", *found] if self.graph.differentiable(tensor, self.output) else found

    def values(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every tensor of the graph for ``batch`` (one ONNX Runtime run)."""
        with self._lock:
            if self._session is None:
                self._names = list(dict.fromkeys([self.output, *self._tensors]))
                model = promote(self.model, self._names).SerializeToString()
                self._session = create_session(model, self.preference, self.threads)
            session = self._session
        return dict(zip(self._names, session.run(self._names, {self.spec.input.name: batch}), strict=True))

    def tail(self, tensor: str) -> Tail:
        with self._lock:
            if tensor not in self._tails:
                self._tails[tensor] = Tail(self, tensor)
            return self._tails[tensor]

    def run_tail(self, tensor: str, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.tail(tensor).run(batch)


class Tail:
    """The part of the network after one layer, as its own ONNX model: its inputs are the layer's
    tensor and whatever else crosses the cut (a residual branch, an Inception block's siblings)."""

    def __init__(self, explainer: Explainer, tensor: str) -> None:
        graph, model = explainer.graph, explainer.model
        path = graph.path(tensor, explainer.output)
        produced = {o for node in path for o in node.output}
        used = {i for node in path for i in node.input if i}
        self.inputs = [i for i in dict.fromkeys(i for node in path for i in node.input) if i and i not in produced]
        self.inputs = [i for i in self.inputs if i not in graph.constants]
        constants = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] in used]
        initializers = [i for i in model.graph.initializer if i.name in used]
        inputs = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in self.inputs]
        output = onnx.helper.make_tensor_value_info(explainer.output, onnx.TensorProto.FLOAT, None)
        tail_graph = onnx.helper.make_graph([*constants, *path], "tail", inputs, [output], initializers)
        tail = onnx.helper.make_model(tail_graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        self.session = create_session(tail.SerializeToString(), explainer.preference, explainer.threads)
        self.output = explainer.output

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        (result,) = self.session.run([self.output], {name: batch[name] for name in self.inputs})
        return result  # type: ignore[no-any-return]


# -- choosing what to explain -----------------------------------------------------------------


def default_layer(analysis: Analysis, session: FeatureMapSession) -> Layer | None:
    """The feature maps the head reads (CAM's), else the last non-pooling layer still wider than
    one pixel: where pytorch-grad-cam's examples point their methods."""
    if analysis.cam is not None:
        found = next((layer for layer in reversed(analysis.layers) if layer.tensor == analysis.cam.features), None)
        if found is not None:
            return found
    spatial = [
        layer
        for layer in analysis.layers
        if layer.stage != "pooling" and len(session.shapes[layer.tensor]) == 3 and session.shapes[layer.tensor][1] > 1
    ]
    return spatial[-1] if spatial else None


def default_layer_for(
    method: str, analysis: Analysis, session: FeatureMapSession, explainer: Explainer, limit: int
) -> Layer | None:
    """The layer ``method`` explains when none is named: default_layer() when the method applies
    there within ``limit`` forward passes, else the deepest layer still wider than a pixel where
    it does. Score-CAM and Ablation-CAM cost a pass per channel, so on a network whose last
    layer is wide (EfficientNet-Lite0's 1,280 channels) they move to an earlier, narrower one
    instead of refusing a request that named no layer."""

    def fits(layer: Layer) -> bool:
        shape = session.shapes[layer.tensor]
        return (
            method in explainer.methods(layer.tensor, shape)
            and 1 + (shape[0] if method in ("scorecam", "ablationcam") else 0) <= limit
        )

    first = default_layer(analysis, session)
    if first is not None and fits(first):
        return first
    for layer in reversed(analysis.layers):
        shape = session.shapes[layer.tensor]
        if layer.stage != "pooling" and len(shape) == 3 and shape[1] > 1 and fits(layer):
            return layer
    return first


def default_layers(session: FeatureMapSession, explainer: Explainer, limit: int) -> dict[str, str]:
    """The layer each method of LAYER_METHODS explains when none is named, by name (what
    /models/{name}/layers lists as ``explain_layers``)."""
    found = {m: default_layer_for(m, session.analysis, session, explainer, limit) for m in LAYER_METHODS}
    return {method: layer.name for method, layer in found.items() if layer is not None}


@dataclass(frozen=True)
class Occlusion:
    """The grey square: its side and its step, in input pixels. By default a seventh of the input
    without overlap: 49 passes, the 7x7 grid the CAMs' last feature maps have."""

    window: int
    stride: int

    @classmethod
    def default(cls, spec: InputSpec) -> Occlusion:
        window = max(1, -(-min(spec.height, spec.width) // 7))
        return cls(window, window)

    def starts(self, size: int) -> list[int]:
        """Window positions along one axis, the last flush with the edge."""
        last = max(0, size - self.window)
        found = list(range(0, last + 1, self.stride))
        return found if found[-1] == last else [*found, last]

    def passes(self, spec: InputSpec) -> int:
        return len(self.starts(spec.height)) * len(self.starts(spec.width))


def passes(method: str, shape: tuple[int, ...] | None, occlusion: Occlusion, spec: InputSpec) -> int:
    """Forward passes a method costs: one per channel for Score-CAM and Ablation-CAM, one per
    window position for occlusion, one for Grad-CAM and EigenCAM."""
    if method == "occlusion":
        return occlusion.passes(spec)
    if method in ("scorecam", "ablationcam") and shape is not None:
        return 1 + shape[0]
    return 1


# -- the methods ------------------------------------------------------------------------------


def gradcam(explainer: Explainer, values: dict[str, np.ndarray], tensor: str, class_index: int) -> np.ndarray:
    """Grad-CAM at the layer's resolution, not yet scaled: ReLU(sum_k mean(dy_c/dA_k) A_k)."""
    heat: np.ndarray = np.maximum(gradcam_signed(explainer, values, tensor, class_index), 0)
    return heat


def gradcam_signed(explainer: Explainer, values: dict[str, np.ndarray], tensor: str, class_index: int) -> np.ndarray:
    """Grad-CAM before its ReLU: the channels weighted by the spatial means of dy_c/dA_k."""
    output = values[explainer.output]
    seed = np.zeros(output.shape)
    seed[0, class_index] = 1.0
    grad = explainer.graph.gradient(values, tensor, explainer.output, seed)[0]
    weights = grad.reshape(len(grad), -1).mean(1)
    signed: np.ndarray = np.tensordot(weights, values[tensor][0].astype(np.float64), axes=1)
    return signed


def eigencam(activations: np.ndarray) -> np.ndarray:
    """The activations (C, H, W) projected on their first principal component, the sign chosen so
    that the projection agrees with the channels' mean (an SVD's sign is arbitrary)."""
    channels = activations.shape[0]
    flat = activations.reshape(channels, -1).T.astype(np.float64)
    centred = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projection = centred @ vt[0]
    if np.dot(projection, flat.mean(1) - flat.mean()) < 0:
        projection = -projection
    heat: np.ndarray = np.maximum(projection, 0).reshape(activations.shape[1:])
    return heat


def _probability(rows: np.ndarray, kind: str, class_index: int) -> np.ndarray:
    scores = rows.astype(np.float64)
    if kind == "logits":
        scores = np.exp(scores - scores.max(1, keepdims=True))
        scores /= scores.sum(1, keepdims=True)
    chosen: np.ndarray = scores[:, class_index]
    return chosen


def _mask(masks: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, H, W) masks shaped to multiply a batch in the model's layout."""
    return masks[:, None] if spec.layout == "NCHW" else masks[..., None]


def scorecam(
    x: np.ndarray, activations: np.ndarray, class_index: int, spec: InputSpec, kind: str, chunk: int
) -> Method:
    """Score-CAM: each channel's map, upsampled and scaled to [0, 1], masks the input; the class's
    probability on each masked input weighs that channel."""
    scores = []
    for start in range(0, len(activations), chunk):
        masks = np.stack([upsample(a, spec, scale=True) for a in activations[start : start + chunk]])
        rows = yield Pass((x * _mask(masks, spec)).astype(np.float32))
        scores.append(_probability(rows, kind, class_index))
    weights = np.concatenate(scores)
    return np.maximum(np.tensordot(weights, activations.astype(np.float64), axes=1), 0)


def ablationcam(
    values: dict[str, np.ndarray], tensor: str, tail_inputs: list[str], full: float, class_index: int, chunk: int
) -> Method:
    """Ablation-CAM: each channel zeroed in turn, the rest of the network run; a channel weighs
    (y_c - y_c without it) / y_c."""
    activations = values[tensor][0]
    drops = []
    for start in range(0, len(activations), chunk):
        channels = range(start, min(start + chunk, len(activations)))
        batch = {name: np.repeat(values[name], len(channels), axis=0) for name in tail_inputs}
        ablated = batch[tensor].copy()
        for row, channel in enumerate(channels):
            ablated[row, channel] = 0
        batch[tensor] = ablated
        rows = yield Pass(batch, tail=tensor)
        drops.append((full - rows[:, class_index].astype(np.float64)) / (full if abs(full) > 1e-7 else 1e-7))
    weights = np.concatenate(drops)
    return np.maximum(np.tensordot(weights, activations.astype(np.float64), axes=1), 0)


def occlusion(
    x: np.ndarray, class_index: int, spec: InputSpec, kind: str, window: Occlusion, base: float, chunk: int
) -> Method:
    """How much the class's probability drops while each square is grey, averaged per pixel."""
    boxes = [(r, c) for r in window.starts(spec.height) for c in window.starts(spec.width)]
    drops = np.zeros((spec.height, spec.width))
    counts = np.zeros((spec.height, spec.width))
    for start in range(0, len(boxes), chunk):
        masks = np.ones((len(boxes[start : start + chunk]), spec.height, spec.width), np.float32)
        for row, (r, c) in enumerate(boxes[start : start + chunk]):
            masks[row, r : r + window.window, c : c + window.window] = 0
        rows = yield Pass((x * _mask(masks, spec)).astype(np.float32))
        for drop, mask in zip(base - _probability(rows, kind, class_index), masks, strict=True):
            drops += drop * (1 - mask)
            counts += 1 - mask
    return np.maximum(drops / np.maximum(counts, 1), 0)


# -- shaping a map ----------------------------------------------------------------------------


def upsample(heat: np.ndarray, spec: InputSpec, *, scale: bool = False) -> np.ndarray:
    """A (h, w) map bilinearly resized over the model's input (H, W); ``scale``: min-max to [0, 1]."""
    if heat.shape != (spec.height, spec.width):
        image = Image.fromarray(heat.astype(np.float32), mode="F")
        heat = np.asarray(image.resize((spec.width, spec.height), Image.Resampling.BILINEAR), dtype=np.float64)
    return normalise(heat) if scale else heat


def normalise(heat: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a flat map becomes zeros (nothing stands out)."""
    low, high = float(heat.min()), float(heat.max())
    return (heat - low) / (high - low) if high - low > 1e-12 else np.zeros_like(heat, dtype=np.float64)
