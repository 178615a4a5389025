"""Reverse-mode differentiation through an ONNX graph in numpy, for Grad-CAM without torch.

ONNX Runtime computes no gradients (its training build is another package, and it would not serve
a model brought by someone else), so the gradient of a class score with respect to a layer is
computed here from the graph's own initializers and the forward values ONNX Runtime produced: one
rule per operator, applied from the output back to the layer. Only the nodes on a path from the
layer to the output are visited, so Grad-CAM at the last convolution of EfficientNet-Lite0 costs a
1x1 convolution's backward, not the whole network's.

The rules follow PyTorch's backward formulas where a choice exists (ReLU's gradient at 0 is 0,
a max pool gives the gradient to the first maximum of its window, ReLU6's Clip passes it strictly
inside its bounds), so that the result matches autograd: tests/training/test_gradcam.py holds it
to PyTorch's Grad-CAM within 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

Values = dict[str, np.ndarray]
Rule = Callable[[onnx.NodeProto, "Graph", Values, np.ndarray], list[np.ndarray | None]]
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"}


class Graph:
    """An ONNX graph prepared for gradients: its nodes, constants and who produces what."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self.constants: Values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {o: index for index, node in enumerate(self.nodes) for o in node.output}

    def path(self, source: str, target: str) -> list[onnx.NodeProto]:
        """The nodes that lie on a path from ``source`` to ``target``, in graph order."""
        reached = {source}
        downstream = []
        for node in self.nodes:
            if any(i in reached for i in node.input):
                reached.update(node.output)
                downstream.append(node)
        needed = {target}
        path = []
        for node in reversed(downstream):
            if any(o in needed for o in node.output):
                needed.update(i for i in node.input if i in reached)
                path.append(node)
        return path[::-1]

    def differentiable(self, source: str, target: str) -> bool:
        """Whether every node between ``source`` and ``target`` has a rule here."""
        path = self.path(source, target)
        return bool(path) and all(node.op_type in RULES for node in path)

    def needed(self, source: str, target: str) -> list[str]:
        """The forward values the gradient from ``target`` back to ``source`` reads."""
        path = self.path(source, target)
        return list(dict.fromkeys(i for node in path for i in node.input if i and i not in self.constants))

    def gradient(self, values: Values, source: str, target: str, seed: np.ndarray) -> np.ndarray:
        """d(sum(seed * target)) / d(source), from the forward ``values`` of every tensor named by
        ``needed()``; ``seed`` has the target's shape."""
        grads: Values = {target: seed.astype(np.float64)}
        reached = {source} | {o for node in self.path(source, target) for o in node.output}
        for node in reversed(self.path(source, target)):
            upstream = grads.pop(node.output[0], None)
            if upstream is None:
                continue
            for name, grad in zip(node.input, RULES[node.op_type](node, self, values, upstream), strict=False):
                if grad is None or name not in reached:
                    continue
                grads[name] = grads[name] + grad if name in grads else grad
        return grads.get(source, np.zeros_like(values[source], dtype=np.float64))

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _relu(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    return [g * (values[node.input[0]] > 0)]


def _clip(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    """Passes the gradient strictly inside the bounds, as PyTorch's hardtanh (ReLU6) does."""
    x, attrs = values[node.input[0]], attributes(node)
    low = graph.constant(node.input[1]) if len(node.input) > 1 else attrs.get("min")
    high = graph.constant(node.input[2]) if len(node.input) > 2 else attrs.get("max")
    mask = np.ones(x.shape, bool)
    if low is not None:
        mask &= x > low
    if high is not None:
        mask &= x < high
    return [g * mask]


def _abs(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    return [g * np.sign(values[node.input[0]])]


def _sigmoid(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    y = 1 / (1 + np.exp(-values[node.input[0]].astype(np.float64)))
    return [g * y * (1 - y)]


def _softmax(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    axis = attributes(node).get("axis", -1)
    x = values[node.input[0]].astype(np.float64)
    y = np.exp(x - x.max(axis, keepdims=True))
    y /= y.sum(axis, keepdims=True)
    return [y * (g - (g * y).sum(axis, keepdims=True))]


def _unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    while g.ndim > len(shape):
        g = g.sum(0)
    for axis, size in enumerate(shape):
        if size == 1 and g.shape[axis] != 1:
            g = g.sum(axis, keepdims=True)
    return g


def _operand(graph: Graph, values: Values, name: str) -> np.ndarray:
    found = graph.constant(name)
    return found if found is not None else values[name]


def _add(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    return [_unbroadcast(g, _operand(graph, values, i).shape) for i in node.input]


def _mul(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    a, b = (_operand(graph, values, i) for i in node.input)
    return [_unbroadcast(g * b, a.shape), _unbroadcast(g * a, b.shape)]


def _concat(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    axis = attributes(node)["axis"]
    sizes = [_operand(graph, values, i).shape[axis] for i in node.input]
    return list(np.split(g, np.cumsum(sizes)[:-1], axis=axis))


def _reshape(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    return [g.reshape(values[node.input[0]].shape)]


def _mean(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    """GlobalAveragePool, and ReduceMean over any axes (from the attribute or, opset 18+, the input)."""
    x = values[node.input[0]]
    attrs = attributes(node)
    if node.op_type == "GlobalAveragePool":
        axes: list[int] = list(range(2, x.ndim))
    else:
        given = graph.constant(node.input[1]) if len(node.input) > 1 else attrs.get("axes")
        axes = [int(a) % x.ndim for a in np.ravel(given)] if given is not None else list(range(x.ndim))
        if not attrs.get("keepdims", 1):
            g = np.expand_dims(g, tuple(sorted(axes)))
    count = int(np.prod([x.shape[a] for a in axes]))
    return [np.broadcast_to(g / count, x.shape)]


def _gemm(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    """Y = alpha A' B' + beta C: only A's gradient is needed (B and C are weights)."""
    attrs = attributes(node)
    b = _operand(graph, values, node.input[1]).astype(np.float64)
    b = b.T if attrs.get("transB", 0) else b
    grad = attrs.get("alpha", 1.0) * g @ b.T
    return [grad.T if attrs.get("transA", 0) else grad]


def _matmul(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    b = _operand(graph, values, node.input[1]).astype(np.float64)
    return [g @ np.swapaxes(b, -1, -2)]


def _batchnorm(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    scale, _, _, var = (_operand(graph, values, i) for i in node.input[1:5])
    factor = scale / np.sqrt(var + attributes(node).get("epsilon", 1e-5))
    return [g * factor.reshape(1, -1, *([1] * (g.ndim - 2)))]


def _pads(attrs: dict[str, Any], x_hw: tuple[int, ...], y_hw: tuple[int, ...], kernel: list[int]) -> list[int]:
    """Begins then ends, from ``pads`` or resolved from ``auto_pad`` as ONNX defines it."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    spatial = len(kernel)
    if auto in ("NOTSET", "VALID"):
        return list(attrs.get("pads", [0] * 2 * spatial)) if auto == "NOTSET" else [0] * 2 * spatial
    strides, dilations = attrs.get("strides", [1] * spatial), attrs.get("dilations", [1] * spatial)
    total = [
        max(0, (y - 1) * s + (k - 1) * d + 1 - x)
        for x, y, k, s, d in zip(x_hw, y_hw, kernel, strides, dilations, strict=True)
    ]
    small = [t // 2 for t in total]
    large = [t - t // 2 for t in total]
    return small + large if auto == "SAME_UPPER" else large + small


def _windows(
    attrs: dict[str, Any], x_shape: tuple[int, ...], y_shape: tuple[int, ...], kernel: list[int]
) -> tuple[list[int], list[int], list[int], tuple[int, int]]:
    """Strides, dilations, pads and the padded size that every window of the output fits in."""
    strides, dilations = list(attrs.get("strides", [1, 1])), list(attrs.get("dilations", [1, 1]))
    pads = _pads(attrs, x_shape[2:], y_shape[2:], kernel)
    size = tuple(
        max(x + pads[a] + pads[a + 2], (y - 1) * s + (k - 1) * d + 1)
        for a, (x, y, k, s, d) in enumerate(zip(x_shape[2:], y_shape[2:], kernel, strides, dilations, strict=True))
    )
    return strides, dilations, pads, (size[0], size[1])


def _window(i: int, j: int, y_hw: tuple[int, ...], strides: list[int], dilations: list[int]) -> tuple[slice, slice]:
    rows = slice(i * dilations[0], i * dilations[0] + strides[0] * (y_hw[0] - 1) + 1, strides[0])
    cols = slice(j * dilations[1], j * dilations[1] + strides[1] * (y_hw[1] - 1) + 1, strides[1])
    return rows, cols


def _conv(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    """The input's gradient: the transposed convolution of ``g`` with the weights, one kernel tap
    at a time (each tap a grouped matrix product), then the padding cut away."""
    x, w = values[node.input[0]], _operand(graph, values, node.input[1]).astype(np.float64)
    attrs = attributes(node)
    groups = int(attrs.get("group", 1))
    out_channels, per_group, kh, kw = w.shape
    strides, dilations, pads, size = _windows(attrs, x.shape, g.shape, [kh, kw])
    n, _, gh, gw = g.shape
    grad = np.zeros((n, groups * per_group, *size))
    grouped_g = g.reshape(n, groups, out_channels // groups, gh, gw)
    grouped_w = w.reshape(groups, out_channels // groups, per_group, kh, kw)
    for i in range(kh):
        for j in range(kw):
            rows, cols = _window(i, j, (gh, gw), strides, dilations)
            tap = np.einsum("ngohw,goc->ngchw", grouped_g, grouped_w[..., i, j])
            grad[:, :, rows, cols] += tap.reshape(n, groups * per_group, gh, gw)
    return [grad[:, :, pads[0] : pads[0] + x.shape[2], pads[1] : pads[1] + x.shape[3]]]


def _maxpool(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    """Each window's gradient to its first maximum (PyTorch's choice when several tie)."""
    x, attrs = values[node.input[0]], attributes(node)
    kh, kw = attrs["kernel_shape"]
    strides, dilations, pads, size = _windows(attrs, x.shape, g.shape, [kh, kw])
    padded = np.full((*x.shape[:2], *size), -np.inf)
    padded[:, :, pads[0] : pads[0] + x.shape[2], pads[1] : pads[1] + x.shape[3]] = x
    best = np.full(g.shape, -np.inf)
    where = np.zeros(g.shape, np.int64)
    for i in range(kh):
        for j in range(kw):
            window = padded[(slice(None), slice(None), *_window(i, j, g.shape[2:], strides, dilations))]
            better = window > best
            best = np.where(better, window, best)
            where = np.where(better, i * kw + j, where)
    grad = np.zeros(padded.shape)
    for i in range(kh):
        for j in range(kw):
            taps = (slice(None), slice(None), *_window(i, j, g.shape[2:], strides, dilations))
            grad[taps] += g * (where == i * kw + j)
    return [grad[:, :, pads[0] : pads[0] + x.shape[2], pads[1] : pads[1] + x.shape[3]]]


def _averagepool(node: onnx.NodeProto, graph: Graph, values: Values, g: np.ndarray) -> list[np.ndarray | None]:
    """Windows that include the padding divide by the whole window unless count_include_pad is 0."""
    x, attrs = values[node.input[0]], attributes(node)
    kh, kw = attrs["kernel_shape"]
    strides, dilations, pads, size = _windows(attrs, x.shape, g.shape, [kh, kw])
    inside = np.zeros((1, 1, *size))
    inside[:, :, pads[0] : pads[0] + x.shape[2], pads[1] : pads[1] + x.shape[3]] = 1
    counts = np.zeros(g.shape[2:])
    for i in range(kh):
        for j in range(kw):
            counts = counts + inside[(0, 0, *_window(i, j, g.shape[2:], strides, dilations))]
    divisor = np.full(g.shape[2:], kh * kw) if attrs.get("count_include_pad", 0) else np.maximum(counts, 1)
    grad = np.zeros((*x.shape[:2], *size))
    for i in range(kh):
        for j in range(kw):
            grad[(slice(None), slice(None), *_window(i, j, g.shape[2:], strides, dilations))] += g / divisor
    return [grad[:, :, pads[0] : pads[0] + x.shape[2], pads[1] : pads[1] + x.shape[3]]]


RULES: dict[str, Rule] = {
    "Conv": _conv,
    "Relu": _relu,
    "Clip": _clip,
    "Abs": _abs,
    "Sigmoid": _sigmoid,
    "Softmax": _softmax,
    "Add": _add,
    "Sum": _add,
    "Mul": _mul,
    "Concat": _concat,
    "MaxPool": _maxpool,
    "AveragePool": _averagepool,
    "GlobalAveragePool": _mean,
    "ReduceMean": _mean,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "BatchNormalization": _batchnorm,
    **dict.fromkeys(RESHAPES, _reshape),
}
