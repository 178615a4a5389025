"""training/exemplars.py on the real LeNet-5 and a few hundred real test images, checked against an
independent ONNX Runtime run, and its receptive fields against the arithmetic done by hand."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from app.serving.inspect.graph import find_layers
from training.data import load_split
from training.exemplars import TOP, Field, atlas, receptive_fields, search

from ..conftest import MODELS

IMAGES = 300


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_split("test").images[:IMAGES]


@pytest.fixture(scope="module")
def found(images: np.ndarray) -> dict:
    return search(MODELS / "lenet5", images, batch=128, progress=False)


def conv_outputs(images: np.ndarray) -> dict[str, np.ndarray]:
    """Every Conv node's output over ``images``, by one plain ONNX Runtime session of our own."""
    model = onnx.load(str(MODELS / "lenet5" / "model.onnx"))
    spec = json.loads((MODELS / "lenet5" / "model.json").read_text())["input"]
    convs = [node.output[0] for node in model.graph.node if node.op_type == "Conv"]
    for name in convs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = ((images.astype(np.float32) - spec["mean"][0]) / spec["std"][0])[:, None]
    return dict(zip(["features.conv1", "features.conv2"], session.run(convs, {spec["name"]: x}), strict=True))


def test_each_channels_exemplars_are_the_images_with_the_largest_maxima(found, images):
    for layer, maps in conv_outputs(images).items():
        peaks = maps.reshape(*maps.shape[:2], -1).max(-1)  # (images, channels)
        for channel, rows in enumerate(found["layers"][layer]["channels"]):
            assert len(rows) == TOP
            assert rows[0][0] == int(peaks[:, channel].argmax())
            expected = np.sort(peaks[:, channel])[::-1][:TOP]
            np.testing.assert_allclose([row[1] for row in rows], expected, atol=1e-4)


def test_the_position_is_where_the_maximum_lies(found, images):
    maps = conv_outputs(images)["features.conv2"]
    index, activation, y, x = found["layers"]["features.conv2"]["channels"][3][0][:4]
    assert maps[index, 3, y, x] == pytest.approx(activation, abs=1e-4)


def test_lenet5s_first_convolution_sees_5x5_patches_clipped_at_the_border(found):
    model = onnx.load(str(MODELS / "lenet5" / "model.onnx"))
    first = receptive_fields(model)[tensor(model, "features.conv1")]
    assert first == Field(offset=-2, jump=1, size=5)  # 5x5 kernel, padding 2
    assert first.box(10, 12, 28, 28) == (8, 10, 13, 15)
    assert first.box(0, 27, 28, 28) == (0, 25, 3, 28)
    for row in found["layers"]["features.conv1"]["channels"][0]:
        top, left, bottom, right = row[4:]
        assert 3 <= bottom - top <= 5 and 3 <= right - left <= 5


def test_fields_grow_through_pooling_and_meet_at_residual_additions():
    lenet = onnx.load(str(MODELS / "lenet5" / "model.onnx"))
    assert receptive_fields(lenet)[tensor(lenet, "features.conv2")] == Field(-2, 2, 14)  # 5 + 1 (pool) + 4 * 2
    resnet = onnx.load(str(MODELS / "resnet" / "model.onnx"))
    shortcut = tensor(resnet, "layer2.0.shortcut.bn")
    # stem 3, two blocks of two 3x3 convs: 11, offset -5; a 1x1 stride-2 projection keeps it
    assert receptive_fields(resnet)[shortcut] == Field(offset=-5, jump=2, size=11)


def test_the_atlas_holds_each_named_image_once_in_order(found, images):
    used = found["images"]
    grid = atlas(images, used)
    assert len(set(used)) == len(used)
    last = len(used) - 1
    row, column = divmod(last, 64)
    np.testing.assert_array_equal(grid[row * 28 : row * 28 + 28, column * 28 : column * 28 + 28], images[used[last]])


def tensor(model: onnx.ModelProto, layer: str) -> str:
    return next(entry.tensor for entry in find_layers(model) if entry.name == layer)
