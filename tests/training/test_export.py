import json

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from app.serving.spec import ModelSpec, json_schema
from training import export, nets, pretrained, train
from training.data import FASHION_LABELS, load_split

from ..conftest import MODELS


@pytest.fixture(scope="module")
def fashion_test():
    split = load_split("test")
    return train.normalise(split.images[:64]).numpy(), split.labels[:64]


def lenet_spec(name: str = "tiny") -> dict:
    return {
        "name": name,
        "input": export.FASHION_INPUT,
        "output": {"name": "logits", "kind": "logits"},
        "labels": FASHION_LABELS,
        "source": {"architecture": "LeNet5", "dataset": "Fashion-MNIST"},
    }


class CountsItsCalls(torch.nn.Module):
    """A forward that updates a buffer: the exported graph keeps the value from export time, so
    ONNX Runtime's answers drift from PyTorch's after the first call. The kind of silent export
    bug the check exists to catch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nets.create("lenet5").eval()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x) * self.calls


def test_export_writes_an_onnx_model_that_matches_pytorch(tmp_path, fashion_test):
    inputs, labels = fashion_test
    model = nets.create("lenet5").eval()
    folder = export.export_checked(model, inputs, tmp_path, lenet_spec(), accuracy_on=(labels, "Fashion-MNIST"))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"input": inputs})
    with torch.no_grad():
        assert np.allclose(onnx_logits, model(torch.from_numpy(inputs)).numpy(), atol=1e-4)
    spec = ModelSpec.model_validate_json((folder / "model.json").read_text())
    assert spec.sha256 == export.sha256(folder / "model.onnx")
    assert spec.accuracy.samples == 64


def test_export_keeps_the_batch_dimension_dynamic(tmp_path, fashion_test):
    folder = export.export_checked(nets.create("lenet5").eval(), fashion_test[0], tmp_path, lenet_spec())
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)
    assert session.run(None, {"input": fashion_test[0][:13]})[0].shape == (13, 10)


def test_export_refuses_a_model_whose_onnx_output_differs(tmp_path, fashion_test):
    with pytest.raises(export.ExportMismatch, match="differs from PyTorch at batch 8"):
        export.export_checked(CountsItsCalls().eval(), fashion_test[0], tmp_path, lenet_spec())
    assert not (tmp_path / "tiny").exists()
    assert not list(tmp_path.iterdir())


def test_the_full_onnx_check_refuses_a_graph_whose_types_do_not_hold(tmp_path):
    """A Conv fed INT64 is well-formed protobuf but not a valid model: the full check (with strict
    shape and type inference) refuses it, where the plain check would let it pass."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"])],
        "mistyped",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.INT64, [1, 1, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 2, 2])],
        [onnx.numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")],
    )
    path = tmp_path / "mistyped.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), path)
    onnx.checker.check_model(str(path))  # the light check finds nothing wrong
    with pytest.raises(onnx.shape_inference.InferenceError):
        export.check_graph(path)


def test_export_refuses_a_spec_that_breaks_the_schema(tmp_path, fashion_test):
    broken = {**lenet_spec(), "input": {**export.FASHION_INPUT, "color": "CMYK"}}
    with pytest.raises(jsonschema.ValidationError):
        export.export_checked(nets.create("lenet5").eval(), fashion_test[0], tmp_path, broken)
    assert not (tmp_path / "tiny").exists()


def test_committed_schema_is_the_one_app_spec_generates():
    assert json.loads((MODELS / "model.schema.json").read_text()) == json_schema()


@pytest.mark.parametrize("folder", sorted(p for p in MODELS.iterdir() if p.is_dir()), ids=lambda p: p.name)
def test_every_committed_model_json_validates_and_matches_its_onnx(folder):
    spec = json.loads((folder / "model.json").read_text())
    jsonschema.validate(spec, json_schema())
    assert spec["sha256"] == export.sha256(folder / "model.onnx")


@pytest.mark.parametrize("arch", ["lenet5", "alexnet", "googlenet", "resnet"])
def test_trained_models_reach_their_accuracy_goal(arch):
    goals = {"lenet5": 0.915, "alexnet": 0.920, "googlenet": 0.935, "resnet": 0.945}
    spec = json.loads((MODELS / arch / "model.json").read_text())
    assert spec["accuracy"]["samples"] == 10000
    assert spec["accuracy"]["top1"] >= goals[arch]


def test_imagenet_labels_are_1000_unique_readable_names():
    labels = pretrained.imagenet_labels()
    assert len(set(labels)) == 1000
    assert labels[281] == "tabby cat" and labels[282] == "tiger cat" and labels[967] == "espresso"


def test_efficientnet_sees_the_cat_and_the_espresso(photos):
    model = pretrained.load_model()
    labels = pretrained.imagenet_labels()
    from training.photos import preprocess

    for photo, expected in (("chelsea", "cat"), ("coffee", "espresso")):
        with torch.no_grad():
            logits = model(torch.from_numpy(preprocess(photos[photo], pretrained.INPUT)))
        assert expected in labels[int(logits.argmax())]
