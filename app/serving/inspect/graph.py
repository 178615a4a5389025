"""What an ONNX CNN's graph offers to look at, read from the graph alone so that a model someone
else exported works too: the outputs of convolutions, detectors, pooling and block ends, their
hyper-parameters, and whether the network ends in global average pooling plus one linear layer
(so a class activation map can be drawn).

Names come from the PyTorch module paths the dynamo exporter records in each node's metadata
(``pkg.torch.onnx.name_scopes``); a graph without them falls back to node names, then to
``OpType_index``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

STAGES = {
    "Conv": "convolution",
    "ConvTranspose": "convolution",
    "Relu": "detector",
    "Clip": "detector",
    "LeakyRelu": "detector",
    "PRelu": "detector",
    "Elu": "detector",
    "Selu": "detector",
    "Celu": "detector",
    "Sigmoid": "detector",
    "HardSigmoid": "detector",
    "HardSwish": "detector",
    "Tanh": "detector",
    "Softplus": "detector",
    "Gelu": "detector",
    "Mish": "detector",
    "Abs": "detector",
    "MaxPool": "pooling",
    "AveragePool": "pooling",
    "LpPool": "pooling",
    "GlobalAveragePool": "pooling",
    "GlobalMaxPool": "pooling",
    "Add": "block",
    "Sum": "block",
    "Concat": "block",
}
BLOCK_SUFFIX = {"Add": "add", "Sum": "add", "Concat": "concat"}
PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Identity", "Dropout"}


@dataclass(frozen=True)
class Layer:
    name: str
    tensor: str
    input_tensor: str
    operator: str
    stage: str
    kernel: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    padding: tuple[int, ...] | None = None  # ONNX order: begins then ends
    dilation: tuple[int, ...] | None = None
    groups: int | None = None
    parameters: int | None = None
    ceil_mode: bool = False
    auto_pad: str = "NOTSET"
    folded_batchnorm: bool = False


@dataclass(frozen=True)
class CamHead:
    """Global average pooling of ``features`` followed by one linear layer of ``weights``
    (classes x channels): CAM for class c is sum_k weights[c, k] * features[k]."""

    features: str
    weights: np.ndarray = field(repr=False)


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _metadata(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def readable_name(node: onnx.NodeProto, index: int) -> str:
    """The PyTorch module path for modules (``features.conv1``), the enclosing module plus the
    operation for functional block ends (``layer1.0.add``), else the node's own name."""
    scopes = _scopes(node)
    if scopes:
        path = [s for s in scopes[:-1] if s]
        if path or node.op_type in BLOCK_SUFFIX:
            module = path[-1] if path else ""
            if node.op_type in BLOCK_SUFFIX:
                return f"{module}.{BLOCK_SUFFIX[node.op_type]}".lstrip(".")
            return module
    return node.name or f"{node.op_type}_{index}"


def _scopes(node: onnx.NodeProto) -> list[str]:
    """The exporter writes the scope list as a Python literal; anything else is ignored."""
    try:
        scopes = ast.literal_eval(_metadata(node).get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return []
    return [str(s) for s in scopes] if isinstance(scopes, list) else []


def _is_feature_map(tensor: str, ranks: dict[str, int]) -> bool:
    return ranks.get(tensor, 4) == 4


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Every node worth showing, in graph (topological) order, with unique readable names."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
        if v.type.tensor_type.HasField("shape")
    }
    initializers = {i.name: i for i in model.graph.initializer}
    layers: list[Layer] = []
    seen: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        stage = STAGES.get(node.op_type)
        if stage is None or not _is_feature_map(node.output[0], ranks):
            continue
        if stage == "block" and not _is_block_end(node, initializers, ranks):
            continue
        name = readable_name(node, index)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        layers.append(_layer(node, name, stage, initializers))
    return layers


def _is_block_end(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], ranks: dict[str, int]) -> bool:
    """A residual addition or a channel concatenation of computed feature maps, not a bias add."""
    computed = [i for i in node.input if i and i not in initializers]
    if len(computed) < 2 or not all(_is_feature_map(i, ranks) for i in computed):
        return False
    return node.op_type != "Concat" or _attributes(node).get("axis") in (1, -3)


def _layer(node: onnx.NodeProto, name: str, stage: str, initializers: dict[str, onnx.TensorProto]) -> Layer:
    attrs = _attributes(node)
    common = {
        "name": name,
        "tensor": node.output[0],
        "input_tensor": node.input[0],
        "operator": node.op_type,
        "stage": stage,
    }
    if node.op_type in ("Conv", "ConvTranspose"):
        weight = initializers.get(node.input[1])
        weight_shape = tuple(weight.dims) if weight is not None else None
        kernel = tuple(attrs.get("kernel_shape") or (weight_shape[2:] if weight_shape else ()))
        parameters = None
        if weight is not None:
            parameters = int(np.prod(weight.dims))
            if len(node.input) > 2 and node.input[2] in initializers:
                parameters += int(np.prod(initializers[node.input[2]].dims))
        scopes = _metadata(node).get("pkg.torch.onnx.class_hierarchy", "")
        return Layer(
            **common,
            **_window(attrs, kernel),
            groups=int(attrs.get("group", 1)),
            parameters=parameters,
            folded_batchnorm="BatchNorm" in scopes,
        )
    if node.op_type in ("MaxPool", "AveragePool", "LpPool"):
        return Layer(**common, **_window(attrs, tuple(attrs["kernel_shape"])), ceil_mode=bool(attrs.get("ceil_mode")))
    return Layer(**common)


def _window(attrs: dict[str, Any], kernel: tuple[int, ...]) -> dict[str, Any]:
    spatial = len(kernel)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    return {
        "kernel": kernel,
        "stride": tuple(attrs.get("strides", [1] * spatial)),
        "padding": tuple(attrs.get("pads", [0] * (2 * spatial))),
        "dilation": tuple(attrs.get("dilations", [1] * spatial)),
        "auto_pad": auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad,
    }


def predicted_size(layer: Layer, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The lecture's (N + 2P - F) / S + 1, generalised to asymmetric padding, dilation
    (F becomes D(F - 1) + 1), ceil mode and ONNX's auto_pad."""
    kernel, stride, padding, dilation = layer.kernel, layer.stride, layer.padding, layer.dilation
    # _window() sets all four together, so a layer with a kernel has the other three as well
    if kernel is None or stride is None or padding is None or dilation is None or layer.operator == "ConvTranspose":
        return None
    sizes = []
    for axis, n in enumerate(input_hw):
        f, s, d = kernel[axis], stride[axis], dilation[axis]
        if layer.auto_pad.startswith("SAME"):
            sizes.append(-(-n // s))
            continue
        pad = 0 if layer.auto_pad == "VALID" else padding[axis] + padding[axis + len(input_hw)]
        span = n + pad - (d * (f - 1) + 1)
        sizes.append((-(-span // s) if layer.ceil_mode else span // s) + 1)
    return sizes[0], sizes[1]


def find_cam_head(model: onnx.ModelProto, output_name: str) -> CamHead | None:
    """Walk back from the logits: Gemm/MatMul(+Add) <- reshapes <- global average pooling."""
    producers = {o: n for n in model.graph.node for o in n.output}
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = producers.get(output_name)
    if node is not None and node.op_type == "Softmax":
        node = producers.get(node.input[0])
    if node is not None and node.op_type == "Add":
        node = next((producers[i] for i in node.input if i in producers), None)
    if node is None or node.op_type not in ("Gemm", "MatMul") or node.input[1] not in initializers:
        return None
    weights = initializers[node.input[1]]
    attrs = _attributes(node)
    if node.op_type == "MatMul" or not attrs.get("transB", 0):
        weights = weights.T
    source = producers.get(node.input[0])
    while source is not None and source.op_type in PASS_THROUGH:
        source = producers.get(source.input[0])
    if source is None or not _is_global_average(source, initializers):
        return None
    return CamHead(features=source.input[0], weights=np.ascontiguousarray(weights, dtype=np.float32))


def _is_global_average(node: onnx.NodeProto, initializers: dict[str, np.ndarray]) -> bool:
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    axes = _attributes(node).get("axes")
    if axes is None and len(node.input) > 1:
        axes = initializers.get(node.input[1])
    return axes is not None and sorted(int(a) % 4 for a in np.ravel(axes)) == [2, 3]
