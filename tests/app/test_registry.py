"""Loading the model repository: broken folders are refused with a reason, the others served, and
an ONNX classifier made without our training code is served from a hand-written model.json."""

import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.config import Settings

from ..conftest import running_client, spec_of


def rewrite_spec(folder, **changes) -> None:
    spec = {**spec_of(folder), **changes}
    (folder / "model.json").write_text(json.dumps(spec))


def reseal(folder) -> None:
    rewrite_spec(folder, sha256=hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest())


def third_party_model(folder) -> None:
    """NHWC input named 'data', softmax output named 'prob', three classes: someone else's CNN."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Transpose", ["data"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["prob"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "someone_elses_cnn",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["n", 32, 32, 3])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", 3])],
        [weight, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    folder.mkdir()
    onnx.save(model, folder / "model.onnx")
    spec = {
        "name": folder.name,
        "input": {
            "name": "data",
            "layout": "NHWC",
            "color": "RGB",
            "height": 32,
            "width": 32,
            "mean": [0, 0, 0],
            "std": [255, 255, 255],
        },
        "output": {"name": "prob", "kind": "probabilities"},
        "labels": ["red", "green", "blue"],
        "source": {"architecture": "hand-made", "dataset": "none"},
        "sha256": hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest(),
    }
    (folder / "model.json").write_text(json.dumps(spec))


BREAKAGES = {
    "bad_json": lambda f: (f / "model.json").write_text("{not json"),
    "missing_onnx": lambda f: (f / "model.onnx").unlink(),
    "hash_mismatch": lambda f: (f / "model.onnx").write_bytes((f / "model.onnx").read_bytes() + b"\0"),
    "corrupt_onnx": lambda f: ((f / "model.onnx").write_bytes(b"\x08\x07garbage" * 100), reseal(f)),
    "shape_lie": lambda f: rewrite_spec(f, labels=["only", "three", "labels"]),
    "wrong_input_name": lambda f: rewrite_spec(f, input={**spec_of(f)["input"], "name": "pixels"}),
    "schema_violation": lambda f: rewrite_spec(f, output={"name": "logits", "kind": "maybe"}),
}
REASONS = {
    "bad_json": "not valid JSON",
    "missing_onnx": "model.onnx is missing",
    "hash_mismatch": "sha256",
    "corrupt_onnx": "not a valid ONNX model",
    "shape_lie": "3 labels",
    "wrong_input_name": "'pixels'",
    "schema_violation": "schema",
}


@pytest.fixture(scope="module")
def broken_repo(tmp_path_factory):
    import shutil

    from ..conftest import MODELS

    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(MODELS / "lenet5", root / "lenet5")
    for name, breakage in BREAKAGES.items():
        shutil.copytree(MODELS / "lenet5", root / name)
        rewrite_spec(root / name, name=name)
        breakage(root / name)
    third_party_model(root / "someone_elses")
    with running_client(Settings(models_dir=root, default_model="lenet5")) as client:
        yield client


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_a_broken_model_is_listed_as_failed_with_its_reason(broken_repo, name):
    info = broken_repo.get(f"/models/{name}").json()
    assert info["status"] == "failed"
    assert REASONS[name] in info["reason"]


def test_good_models_beside_broken_ones_are_served(broken_repo):
    assert broken_repo.get("/readyz").status_code == 200
    listed = {m["name"]: m["status"] for m in broken_repo.get("/models").json()["models"]}
    assert listed["lenet5"] == "ready" and listed["someone_elses"] == "ready"
    assert sum(status == "failed" for status in listed.values()) == len(BREAKAGES)


def test_classifying_with_a_failed_model_is_503_with_the_reason(broken_repo, photos):
    response = broken_repo.post("/classify?model=hash_mismatch", files={"file": photos["chelsea"].read_bytes()})
    assert response.status_code == 503
    assert "sha256" in response.json()["detail"]


def test_a_third_party_model_serves_its_probabilities_as_they_are(broken_repo, photos):
    body = broken_repo.post("/classify?model=someone_elses", files={"file": photos["coffee"].read_bytes()}).json()
    assert {p["label"] for p in body["predictions"]} == {"red", "green", "blue"}
    assert abs(sum(p["score"] for p in body["predictions"]) - 1.0) < 1e-5


def test_readiness_is_503_while_the_default_model_is_missing(repo_copy):
    with running_client(Settings(models_dir=repo_copy, default_model="absent")) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["status"] == "default model unavailable"
