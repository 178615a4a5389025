"""The first convolution's kernels, read from the ONNX initializers, as pictures and as numbers.

The first layer is the one whose weights mean something to the eye (edge and colour detectors in
AlexNet's famous figure): its kernels look at pixels. Each kernel is drawn on its own scale
symmetric around zero, so grey is a zero weight: grey-input kernels on the diverging coolwarm scale,
colour kernels as RGB around mid-grey (as Krizhevsky et al. drew theirs). A network exported with
its batch normalisation folded into the convolution shows the folded weights, which are the ones
that run.
"""

from __future__ import annotations

import math

import numpy as np

from app.serving.inspect import render
from app.serving.inspect.backprop import Graph
from app.serving.inspect.graph import Layer

CELL = 96  # pixels per kernel in the picture, about


def first_convolution(layers: list[Layer]) -> Layer | None:
    return next((layer for layer in layers if layer.operator == "Conv"), None)


def weights(graph: Graph, layer: Layer) -> tuple[np.ndarray, np.ndarray | None]:
    """(out, in / groups, kh, kw) weights and the bias, if the graph holds them as constants."""
    node = graph.nodes[graph.producer[layer.tensor]]
    found = graph.constant(node.input[1])
    if found is None:
        raise LookupError(f"the weights of {layer.name!r} are computed, not stored")
    bias = graph.constant(node.input[2]) if len(node.input) > 2 else None
    return found.astype(np.float32), None if bias is None else bias.astype(np.float32)


def picture(kernels: np.ndarray) -> np.ndarray:
    """The kernels tiled in a near-square grid, (H, W, 3) uint8."""
    out, channels, height, width = kernels.shape
    upscale = max(1, CELL // max(height, width))
    if channels != 3:
        return render.tile(kernels.mean(1), "coolwarm", upscale, True)
    bound = np.abs(kernels).reshape(out, -1).max(1).reshape(out, 1, 1, 1)
    levels = ((kernels / np.where(bound > 0, bound, 1) + 1) * 127.5).round().astype(np.uint8)
    tiles = levels.transpose(0, 2, 3, 1).repeat(upscale, 1).repeat(upscale, 2)
    th, tw = height * upscale, width * upscale
    cols = math.ceil(math.sqrt(out))
    rows = math.ceil(out / cols)
    canvas = np.empty((rows * (th + 1) + 1, cols * (tw + 1) + 1, 3), np.uint8)
    canvas[:] = render.SEPARATOR
    for k in range(out):
        r, c = divmod(k, cols)
        canvas[1 + r * (th + 1) : 1 + r * (th + 1) + th, 1 + c * (tw + 1) : 1 + c * (tw + 1) + tw] = tiles[k]
    return canvas
