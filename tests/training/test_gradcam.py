"""Grad-CAM from app/serving/inspect/backprop.py (numpy on the ONNX graph, no torch) against
PyTorch autograd's Grad-CAM on the same network, at several layers of every served network."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from app.serving.inspect import explain
from app.serving.inspect.featuremaps import Analysis, FeatureMapSession
from app.serving.spec import ModelSpec
from training import nets, pretrained, train
from training.data import load_split
from training.photos import preprocess

from ..conftest import MODELS

TOLERANCE = 1e-5


def torch_gradcam(model: torch.nn.Module, module: torch.nn.Module, x: np.ndarray, class_index: int) -> np.ndarray:
    """pytorch-grad-cam's recipe: hook the module's output, backpropagate the class's logit, in
    the model's own precision. The tests pass a float64 copy: PyTorch's float32 CPU convolutions
    are themselves off by up to 5e-6 (torch 2.14, GoogLeNet's inception3a pool, where the map's
    terms cancel to a peak of 2e-3), more than ours, which is within 1e-9 of float64."""
    kept: dict[str, torch.Tensor] = {}

    def hook(_: torch.nn.Module, __: object, output: torch.Tensor) -> None:
        output.retain_grad()
        kept["a"] = output

    handle = module.register_forward_hook(hook)
    try:
        logits = model(torch.from_numpy(x).to(next(model.parameters()).dtype))
        logits[0, class_index].backward()
    finally:
        handle.remove()
    activations, grad = kept["a"][0].detach().double(), kept["a"].grad[0].double()
    weights = grad.mean((1, 2))
    return (weights[:, None, None] * activations).sum(0).numpy()


def rectified(signed: np.ndarray) -> np.ndarray:
    """Grad-CAM's ReLU, on the scale of the map before it: a map whose evidence is all negative
    stays near zero instead of having its rounding noise stretched to 1."""
    peak = np.abs(signed).max()
    return np.maximum(signed, 0) / peak if peak > 0 else signed


def explainer_for(onnx_path: Path) -> tuple[explain.Explainer, FeatureMapSession]:
    proto = onnx.load(str(onnx_path))
    spec = ModelSpec.model_validate_json((onnx_path.parent / "model.json").read_text())
    session = FeatureMapSession(proto, spec, Analysis.of(proto, spec), "cpu", 1)
    return explain.Explainer(proto, spec, "cpu", 1), session


def onnx_gradcam(explainer: explain.Explainer, session: FeatureMapSession, layer: str, x: np.ndarray, c: int):
    chosen = session.analysis.layer(layer)
    assert chosen is not None, [layer.name for layer in session.analysis.layers]
    return explain.gradcam_signed(explainer, explainer.values(x), chosen.tensor, c)


def execution_order(model: torch.nn.Module, x: np.ndarray) -> list[torch.nn.Module]:
    """Convolutions, batch norms and linear layers in the order the forward pass runs them."""
    order: list[torch.nn.Module] = []
    kinds = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)
    handles = [m.register_forward_hook(lambda m, *_: order.append(m)) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for handle in handles:
        handle.remove()
    return order


@torch.no_grad()
def load_onnx_weights(model: torch.nn.Module, proto: onnx.ModelProto, x: np.ndarray) -> None:
    """The served model's weights into the PyTorch network it was exported from. The export folded
    each batch norm into its convolution, so the convolution takes the folded weights and the
    batch norm becomes the identity plus the folded bias."""
    weights = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    modules = execution_order(model, x)
    layers = [m for m in modules if not isinstance(m, torch.nn.BatchNorm2d)]
    assert len(nodes) == len(layers)
    for node, layer in zip(nodes, layers, strict=True):
        after = modules.index(layer) + 1
        following = modules[after] if after < len(modules) else None
        layer.weight.copy_(weights[node.input[1]].reshape(layer.weight.shape))
        bias = weights[node.input[2]] if len(node.input) > 2 else torch.zeros(layer.weight.shape[0])
        if isinstance(following, torch.nn.BatchNorm2d):
            following.weight.fill_(1.0)
            following.running_mean.zero_()
            following.running_var.fill_(1.0 - following.eps)
            following.bias.copy_(bias)
            if layer.bias is not None:
                layer.bias.zero_()
        elif layer.bias is not None:
            layer.bias.copy_(bias)


def fashion_images(count: int) -> np.ndarray:
    return train.normalise(load_split("test").images[:count]).numpy()


def fashion_model(arch: str) -> tuple[torch.nn.Module, Path]:
    """The served network (models/ARCH) as PyTorch."""
    path = MODELS / arch / "model.onnx"
    model = nets.create(arch).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False  # else the hooked convolution's output is overwritten by its ReLU
    load_onnx_weights(model, onnx.load(str(path)), fashion_images(1))
    return model, path


def assert_same_gradcam(model, path, images, layers) -> None:
    explainer, session = explainer_for(path)
    (logits,) = session.run(images, [explainer.output])
    with torch.no_grad():
        assert np.abs(model(torch.from_numpy(images)).numpy() - logits).max() < 1e-3
    reference = copy.deepcopy(model).double()
    for name, module in layers.items():
        for row in range(len(images)):
            x = images[row : row + 1]
            c = int(logits[row].argmax()) if row % 2 == 0 else int(logits[row].argsort()[-2])
            ours = onnx_gradcam(explainer, session, name, x, c)
            theirs = torch_gradcam(reference, reference.get_submodule(module), x, c)
            assert ours.shape == theirs.shape
            assert theirs.max() > 0 or row > 0, name  # not a vacuous comparison
            assert np.abs(rectified(ours) - rectified(theirs)).max() < TOLERANCE, (name, row)


@pytest.mark.parametrize(
    ("arch", "layers"),
    [
        ("lenet5", {"features.relu2": "features.relu2", "features.pool1": "features.pool1"}),
        ("alexnet", {"features.conv5.relu": "features.conv5.relu", "features.conv2.bn": "features.conv2.bn"}),
        ("resnet", {"layer3.1.relu2": "layer3.1.relu2", "layer2.0.relu2": "layer2.0.relu2", "stem.bn": "stem.bn"}),
        (
            "googlenet",
            {"inception4b.concat": "inception4b", "inception3a.branch_pool.pool": "inception3a.branch_pool.pool"},
        ),
    ],
)
def test_gradcam_matches_pytorch_autograd(arch, layers):
    """The served Fashion-MNIST networks: the map equals autograd's (in float64) within 1e-5 of its
    peak (the peak of the map before the ReLU, the scale its values live on)."""
    model, path = fashion_model(arch)
    assert_same_gradcam(model, path, fashion_images(4), layers)


def test_gradcam_matches_pytorch_autograd_on_efficientnet_lite0(photos):
    """The served EfficientNet-Lite0 (ReLU6 as Clip, depthwise convolutions, residual additions)
    against the PyTorch network it was exported from, on a real photo."""
    model = pretrained.load_model().eval()
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    path = MODELS / "efficientnet_lite0" / "model.onnx"
    spec = ModelSpec.model_validate_json((path.parent / "model.json").read_text())
    x = preprocess(photos["chelsea"], spec.input.model_dump())
    layers = {"_swish#2": "_swish", "_blocks.15._bn2": "_blocks.15._bn2", "_blocks.14.add": "_blocks.14"}
    assert_same_gradcam(model, path, np.concatenate([x, x[:, :, ::-1].copy()]), layers)
