"""Layers as a reader meets them: descriptions with the lecture's output-size formula, the choice of
a layer and of its channels, and the class activation map's arithmetic."""

from __future__ import annotations

import numpy as np

from app.serving.errors import InvalidParameter, NotFound
from app.serving.inspect.featuremaps import FeatureMapSession
from app.serving.inspect.graph import CamHead, Layer
from app.serving.schemas import LayerInfo


def describe(layer: Layer, session: FeatureMapSession) -> LayerInfo:
    predicted = session.predicted(layer)
    input_shape = session.shapes.get(layer.input_tensor)
    return LayerInfo(
        name=layer.name,
        operator=layer.operator,
        stage=layer.stage,  # graph.STAGES holds only LayerInfo's stages
        output_shape=list(session.shapes[layer.tensor]),
        input_shape=list(input_shape) if input_shape and layer.kernel is not None else None,
        kernel=_list(layer.kernel),
        stride=_list(layer.stride),
        padding=_list(layer.padding),
        dilation=_list(layer.dilation),
        groups=layer.groups,
        parameters=layer.parameters,
        folded_batchnorm=layer.folded_batchnorm,
        predicted_output=list(predicted) if predicted else None,
        formula=formula(layer, input_shape, predicted),
    )


def _list(values: tuple[int, ...] | None) -> list[int] | None:
    return list(values) if values is not None else None


def formula(layer: Layer, input_shape: tuple[int, ...] | None, predicted: tuple[int, int] | None) -> str | None:
    """The lecture's formula with this layer's numbers, for the height axis."""
    if predicted is None or input_shape is None or layer.auto_pad != "NOTSET":
        return None
    assert layer.kernel is not None and layer.stride is not None  # predicted_size needs both
    assert layer.dilation is not None and layer.padding is not None
    n, f, s, d = input_shape[-2], layer.kernel[0], layer.stride[0], layer.dilation[0]
    top, bottom = layer.padding[0], layer.padding[len(layer.kernel)]
    pad = f"2*{top}" if top == bottom else f"{top}+{bottom}"
    span = f if d == 1 else f"{d}*({f}-1)+1"
    rounding = "ceil" if layer.ceil_mode else "floor"
    return f"(N + 2P - F) / S + 1 = {rounding}(({n} + {pad} - {span}) / {s}) + 1 = {predicted[0]}"


def pick(session: FeatureMapSession, name: str | None) -> Layer:
    """The layer called ``name``, or the first convolution when none is named."""
    layer = session.analysis.layer(name) if name else session.analysis.default_layer
    if layer is None:
        known = [layer.name for layer in session.analysis.layers]
        raise NotFound(f"unknown layer {name!r}; GET /models/{session.spec.name}/layers lists them: {known[:20]}")
    return layer


def parse_channels(text: str | None, available: int, limit: int) -> list[int]:
    """``0-15`` or ``0,3,8-11`` -> sorted channel indices; none named: the first ``limit``."""
    if text is None:
        return list(range(min(available, limit)))
    chosen: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise InvalidParameter(f"channels {text!r}: write ranges such as 0-15 or 0,3,8-11") from None
        if low > high:
            raise InvalidParameter(f"channel range {part!r} runs backwards")
        if high >= available:
            raise InvalidParameter(f"channel {high} does not exist: this layer has channels 0-{available - 1}")
        chosen.update(range(low, high + 1))
        if len(chosen) > limit:
            raise InvalidParameter(f"at most {limit} channels per request; ask for a range such as 0-{limit - 1}")
    return sorted(chosen)


def class_activation(head: CamHead, features: np.ndarray, class_index: int) -> np.ndarray:
    """CAM: the last feature maps weighted by the class's linear weights, after ReLU, scaled to [0, 1]."""
    heat = np.maximum(np.tensordot(head.weights[class_index], features, axes=1), 0)
    peak = heat.max()
    return heat / peak if peak > 0 else heat
