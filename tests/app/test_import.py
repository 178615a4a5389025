"""``cnnserve import`` and ``cnnserve check`` for ONNX files, without torch: small real networks
built with onnx.helper, imported through the command line, checked by the service's loader and
served by real servers (poll and explicit mode) that pick them up without a restart."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from app.cli import parse_args
from app.config import Settings
from app.importing import run_check, run_import
from app.serving import check, importer
from app.serving.presets import IMAGENET_MEAN, on_pixel_scale
from app.serving.spec import Source

from ..conftest import live_server

CLASSES = 5
LABELS = ["cat", "coffee", "person", "rocket", "hat"]


def tiny_cnn(
    path: Path,
    *,
    shape: tuple[int | str, ...] = ("batch", 3, 32, 32),
    classes: int = CLASSES,
    head: bool = True,
    custom: bool = False,
    edges: bool = False,
    nhwc: bool = False,
) -> Path:
    """Conv 3x3 -> ReLU -> global average pool -> flatten -> linear, random weights (seed 0);
    ``edges``: each kernel a Laplacian, whose response depends on the image's scale."""
    rng = np.random.default_rng(0)
    kernels = rng.standard_normal((8, 3, 3, 3))
    if edges:
        kernels = rng.standard_normal((8, 3, 1, 1)) * np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]])
    weights = [
        numpy_helper.from_array(kernels.astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((classes, 8)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fcb"),
    ]
    first = "x"
    if nhwc:  # channels last, as TensorFlow's exports take them
        first = "x_nchw"
        shape = (shape[0], shape[2], shape[3], shape[1])
    nodes = [helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw")] if nhwc else []
    nodes += [
        helper.make_node("Conv", [first, "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
    ]
    if custom:
        nodes.append(helper.make_node("Sparkle", ["relu"], ["relu2"], domain="com.example", name="sparkle"))
    last = "relu2" if custom else "relu"
    if head:
        nodes += [
            helper.make_node("GlobalAveragePool", [last], ["pool"], name="pool"),
            helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
            helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1, name="fc"),
        ]
        output = helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [shape[0], classes])
    else:
        output = helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, [shape[0], 8, *shape[2:]])
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))], [output], weights
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.example", 1)] if custom else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def imported(repo: Path, source: Path, name: str, *flags: str) -> int:
    return run_import(parse_args(["import", str(source), "--name", name, "--models-dir", str(repo), *flags]))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sources")
    tiny_cnn(folder / "tiny.onnx")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return folder


@pytest.fixture(scope="module")
def repo(tmp_path_factory, sources) -> Path:
    """A repository holding the tiny network imported with the imagenet preset and a labels file."""
    folder = tmp_path_factory.mktemp("repo")
    assert (
        imported(folder, sources / "tiny.onnx", "tiny", "--preset", "imagenet", "--labels", str(sources / "labels.txt"))
        == 0
    )
    return folder


@pytest.fixture(scope="module")
def poll_server(repo) -> str:
    env = {
        "CNNSERVE_MODELS_DIR": str(repo),
        "CNNSERVE_DEFAULT_MODEL": "tiny",
        "CNNSERVE_MODEL_CONTROL": "poll",
        "CNNSERVE_POLL_INTERVAL_S": "0.2",
        "CNNSERVE_PROCESSES": "1",
    }
    with live_server(**env) as (url, _):
        yield url


def refusal(capsys, repo: Path, source: Path, *flags: str, name: str = "wrong") -> str:
    assert imported(repo, source, name, *flags) == 1
    assert not (repo / name).exists()
    return capsys.readouterr().err


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.1)


def classify(url: str, photo: Path, model: str) -> dict:
    response = httpx.post(f"{url}/classify", params={"model": model}, files={"file": (photo.name, photo.read_bytes())})
    assert response.status_code == 200, response.text
    return response.json()


# -- the folder ---------------------------------------------------------------------------------


def test_the_folder_holds_what_the_graph_and_the_preset_say(repo, sources):
    spec = json.loads((repo / "tiny" / "model.json").read_text())
    assert spec["input"]["name"] == "x" and spec["input"]["layout"] == "NCHW"
    assert (spec["input"]["height"], spec["input"]["width"]) == (32, 32)
    assert spec["input"]["resize"] == 36  # the preset's 224 of 256, at the graph's 32
    assert spec["input"]["mean"] == on_pixel_scale(IMAGENET_MEAN)
    assert spec["output"] == {"name": "logits", "kind": "logits"}
    assert spec["labels"] == LABELS
    assert spec["sha256"] == hashlib.sha256((sources / "tiny.onnx").read_bytes()).hexdigest()
    labels = sources / "labels.txt"
    assert (
        spec["source"]["command"]
        == f"cnnserve import {sources / 'tiny.onnx'} --name tiny --preset imagenet --labels {labels}"
    )


def test_nothing_half_written_is_left_in_the_repository(repo):
    assert sorted(p.name for p in repo.iterdir() if p.name.startswith(".")) == []


def test_the_built_in_imagenet_labels(tmp_path, sources):
    source = tiny_cnn(tmp_path / "thousand.onnx", classes=1000)
    assert imported(tmp_path / "repo", source, "thousand", "--preset", "imagenet", "--labels", "imagenet") == 0
    labels = json.loads((tmp_path / "repo" / "thousand" / "model.json").read_text())["labels"]
    assert len(labels) == 1000 and labels[281] == "tabby cat"


def test_a_dynamic_input_takes_the_size_given(tmp_path):
    source = tiny_cnn(tmp_path / "dynamic.onnx", shape=("batch", 3, "height", "width"))
    assert imported(tmp_path / "repo", source, "dynamic", "--preset", "imagenet", "--size", "64") == 0
    spec = json.loads((tmp_path / "repo" / "dynamic" / "model.json").read_text())["input"]
    assert (spec["height"], spec["width"], spec["resize"]) == (64, 64, 73)  # 224 of 256 at 64


# -- served over HTTP, picked up while serving ---------------------------------------------------


def test_served_answers_are_the_checks(poll_server, repo, photos):
    model = check.load(repo / "tiny", "tiny", "1", Settings(models_dir=repo))
    expected = check.run(model, model.spec.input, photos["chelsea"].read_bytes(), 50_000_000)
    served = classify(poll_server, photos["chelsea"], "tiny")["predictions"]
    assert [p["index"] for p in served] == np.argsort(-expected)[:5].tolist()
    assert served[0]["label"] == LABELS[int(expected.argmax())]


def test_an_import_into_a_polled_repository_serves_without_a_restart(poll_server, repo, sources, photos):
    assert httpx.get(f"{poll_server}/models/fresh").status_code == 404
    assert imported(repo, sources / "tiny.onnx", "fresh", "--preset", "imagenet") == 0
    wait_for(lambda: httpx.get(f"{poll_server}/models/fresh").status_code == 200)
    assert classify(poll_server, photos["coffee"], "fresh")["model"] == "fresh"


def test_importing_an_existing_model_adds_its_next_version(poll_server, repo, sources):
    assert (
        imported(repo, sources / "tiny.onnx", "tiny", "--preset", "inception", "--labels", str(sources / "labels.txt"))
        == 0
    )
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1", "2"]
    assert json.loads((repo / "tiny" / "2" / "model.json").read_text())["input"]["std"] == [127.5] * 3

    def serves_version_2() -> bool:
        listing = httpx.get(f"{poll_server}/models/tiny").json()
        return listing.get("version") == "2" and listing["input"]["std"] == [127.5] * 3

    wait_for(serves_version_2)


def test_an_import_asks_an_explicit_mode_server_to_load_it(tmp_path, sources, photos):
    repo = tmp_path / "repo"
    assert imported(repo, sources / "tiny.onnx", "first", "--preset", "imagenet") == 0
    env = {
        "CNNSERVE_MODELS_DIR": str(repo),
        "CNNSERVE_DEFAULT_MODEL": "first",
        "CNNSERVE_MODEL_CONTROL": "explicit",
        "CNNSERVE_LOAD_MODELS": "first",
        "CNNSERVE_PROCESSES": "1",
    }
    with live_server(**env) as (url, _):
        assert imported(repo, sources / "tiny.onnx", "second", "--preset", "imagenet", "--url", url) == 0
        assert classify(url, photos["chelsea"], "second")["model"] == "second"


# -- the check alone ---------------------------------------------------------------------------


def test_check_prints_latency_layers_and_explanations(tmp_path, sources, capsys):
    assert imported(tmp_path, sources / "tiny.onnx", "tiny", "--preset", "imagenet") == 0
    capsys.readouterr()
    assert run_check(parse_args(["check", "tiny", "--models-dir", str(tmp_path)])) == 0
    out = capsys.readouterr().out
    assert " ms)" in out and "chelsea" in out
    assert "/featuremaps offers 3 layers: conv, relu, pool" in out
    assert "gradcam (relu)" in out and "occlusion" in out


def test_a_wrong_channel_order_is_named(tmp_path, sources, photos):
    """The framework's answers here are the model's own on the right preprocessing (RGB); the
    folder says BGR, and the check says that this is the step that differs."""
    assert imported(tmp_path / "right", sources / "tiny.onnx", "tiny", "--preset", "imagenet") == 0
    assert imported(tmp_path / "wrong", sources / "tiny.onnx", "tiny", "--preset", "imagenet", "--color", "BGR") == 0
    right = check.load(tmp_path / "right" / "tiny", "tiny", "1", Settings(models_dir=tmp_path / "right"))

    def framework(path: Path) -> np.ndarray:
        return check.run(right, right.spec.input, path.read_bytes(), 50_000_000)

    with pytest.raises(check.CheckFailed, match="The channel order differs: with RGB they agree"):
        check.check(tmp_path / "wrong" / "tiny", "tiny", "1", Settings(), [photos["chelsea"]], framework, "ours")


def test_a_wrong_size_is_named(tmp_path, photos):
    """A graph that takes any size, trained at 128; the folder says 224."""
    source = tiny_cnn(tmp_path / "dynamic.onnx", shape=("batch", 3, "height", "width"), edges=True)
    assert imported(tmp_path / "right", source, "tiny", "--preset", "imagenet", "--size", "128") == 0
    assert imported(tmp_path / "wrong", source, "tiny", "--preset", "imagenet", "--size", "224") == 0
    right = check.load(tmp_path / "right" / "tiny", "tiny", "1", Settings())

    def framework(path: Path) -> np.ndarray:
        return check.run(right, right.spec.input, path.read_bytes(), 50_000_000)

    with pytest.raises(check.CheckFailed, match="The size differs: with a 128x128 input they agree"):
        check.check(tmp_path / "wrong" / "tiny", "tiny", "1", Settings(), [photos["chelsea"]], framework, "ours")


def test_a_channels_last_graph_is_read_as_nhwc(tmp_path, photos):
    source = tiny_cnn(tmp_path / "nhwc.onnx", nhwc=True)
    assert imported(tmp_path / "repo", source, "nhwc", "--preset", "imagenet") == 0
    spec = json.loads((tmp_path / "repo" / "nhwc" / "model.json").read_text())["input"]
    assert (spec["layout"], spec["height"], spec["width"]) == ("NHWC", 32, 32)


def test_labels_from_an_id2label_json_object(tmp_path, sources):
    (tmp_path / "labels.json").write_text(json.dumps({str(i): name for i, name in reversed(list(enumerate(LABELS)))}))
    flags = ("--preset", "imagenet", "--labels", str(tmp_path / "labels.json"))
    assert imported(tmp_path / "repo", sources / "tiny.onnx", "named", *flags) == 0
    assert json.loads((tmp_path / "repo" / "named" / "model.json").read_text())["labels"] == LABELS


def test_resize_none_overrides_the_presets_crop(tmp_path, sources):
    assert imported(tmp_path, sources / "tiny.onnx", "plain", "--preset", "imagenet", "--resize", "none") == 0
    assert "resize" not in json.loads((tmp_path / "plain" / "model.json").read_text())["input"]


def test_the_help_says_what_each_source_needs(capsys):
    with pytest.raises(SystemExit):
        parse_args(["import", "--help"])
    out = capsys.readouterr().out
    assert "--torchvision ARCH" in out and "Hugging Face" in out and "Nothing is downloaded" in out


def test_check_takes_the_users_images_too(tmp_path, sources, capsys):
    assert imported(tmp_path, sources / "tiny.onnx", "tiny", "--preset", "imagenet") == 0
    image = tmp_path / "mine.png"
    image.write_bytes((check.EXAMPLES / "fashion-0.png").read_bytes())
    assert run_check(parse_args(["check", "tiny", "--models-dir", str(tmp_path), "--image", str(image)])) == 0
    assert "  mine.png: " in capsys.readouterr().out


# -- mistakes, each with its message ---------------------------------------------------------------


def test_an_output_that_is_not_a_class_vector(capsys, tmp_path, sources):
    source = tiny_cnn(tmp_path / "maps.onnx", head=False)
    assert "not a class vector (batch, classes)" in refusal(capsys, tmp_path, source, "--preset", "imagenet")


def test_a_label_count_that_does_not_match(capsys, tmp_path, sources):
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    err = refusal(
        capsys, tmp_path, sources / "tiny.onnx", "--preset", "imagenet", "--labels", str(tmp_path / "two.txt")
    )
    assert "2 labels for 5 classes" in err


def test_dynamic_spatial_dimensions_without_a_size(capsys, tmp_path):
    source = tiny_cnn(tmp_path / "dynamic.onnx", shape=("batch", 3, "height", "width"))
    err = refusal(capsys, tmp_path, source, "--mean", "0,0,0", "--std", "255,255,255")
    assert "dynamic spatial dimensions [?, 3, ?, ?]; give the size it was trained at" in err


def test_a_std_on_the_zero_to_one_scale(capsys, tmp_path, sources):
    err = refusal(capsys, tmp_path, sources / "tiny.onnx", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")
    assert "looks like the 0..1 scale, but model.json takes 0..255 pixels: did you mean --std 58.395" in err


def test_an_operator_onnx_runtime_cannot_run(capsys, tmp_path):
    source = tiny_cnn(tmp_path / "custom.onnx", custom=True)
    err = refusal(capsys, tmp_path, source, "--preset", "imagenet")
    assert "cannot run operator com.example:Sparkle" in err


def test_external_data_outside_the_folder(capsys, tmp_path, sources):
    inside = tmp_path / "inside"
    inside.mkdir()
    proto = onnx.load(str(sources / "tiny.onnx"))
    onnx.save(proto, str(inside / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (inside / "weights.bin").rename(tmp_path / "weights.bin")
    proto = onnx.load(str(inside / "model.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(proto, str(inside / "model.onnx"))
    err = refusal(capsys, tmp_path / "repo", inside / "model.onnx", "--preset", "imagenet")
    assert "external data '../weights.bin' of tensor" in err and "lies outside the model folder" in err


def test_external_data_beside_the_file_is_copied_with_it(tmp_path, sources):
    beside = tmp_path / "beside"
    beside.mkdir()
    proto = onnx.load(str(sources / "tiny.onnx"))
    onnx.save(proto, str(beside / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert imported(tmp_path / "repo", beside / "model.onnx", "external", "--preset", "imagenet") == 0
    assert (tmp_path / "repo" / "external" / "weights.bin").read_bytes() == (beside / "weights.bin").read_bytes()


def test_a_pytorch_file_without_torch_says_what_to_install(capsys, tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"not read")
    err = refusal(capsys, tmp_path, tmp_path / "weights.pth", "--torchvision", "resnet18")
    assert "needs PyTorch" in err and "pip install 'cnnserve[train]'" in err


def test_a_version_taken_meanwhile_is_refused_and_nothing_is_left(tmp_path, sources):
    facts = importer.read_graph(sources / "tiny.onnx")
    spec = importer.input_spec(facts, "imagenet")
    source = Source(architecture="tiny", dataset="none")
    first = importer.stage_model(tmp_path, "tiny", sources / "tiny.onnx", spec, facts, LABELS, source)
    (tmp_path / "tiny" / "1").mkdir(parents=True)  # another import's version 1 arrived first
    (tmp_path / "tiny" / "1" / "model.json").write_text("{}")
    with pytest.raises(importer.ImportRefused, match="tiny version 1 could not be put in place"):
        first.commit()
    assert not first.folder.exists()


def test_unknown_names_are_refused_before_anything_is_written(tmp_path, sources):
    with pytest.raises(importer.ImportRefused, match="not a model name"):
        importer.stage_model(
            tmp_path,
            "Bad/Name",
            sources / "tiny.onnx",
            *_spec_and_facts(sources),
            LABELS,
            Source(architecture="tiny", dataset="none"),
        )
    assert list(tmp_path.iterdir()) == []


def _spec_and_facts(sources: Path) -> tuple:
    facts = importer.read_graph(sources / "tiny.onnx")
    return importer.input_spec(facts, "imagenet"), facts
