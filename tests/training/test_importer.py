"""``cnnserve import`` from PyTorch, timm and Hugging Face, end to end: models built here with
random weights (nothing downloaded), imported through the command line, served over HTTP by a
real server, and answering as their framework does (its own preprocessing and model, computed
here independently of training/importer.py) on the sample photos."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import timm
import timm.data
import torch
import torchvision
import transformers
from PIL import Image, ImageOps

from app.cli import parse_args
from app.importing import run_check, run_import
from app.serving import preprocess
from app.serving.presets import IMAGENET_MEAN, on_pixel_scale
from app.serving.spec import InputSpec

from ..conftest import live_server

HF_LABELS = ["cat", "coffee", "person", "rocket", "hat"]
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def imported(repo: Path, source: Path, name: str, *flags: str) -> int:
    return run_import(parse_args(["import", str(source), "--name", name, "--models-dir", str(repo), *flags]))


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, object]:
    """Each source on disk, and its framework's own answer for a PIL image."""
    folder = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18().eval()
    torch.save(resnet.state_dict(), folder / "resnet18.pth")
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    small = timm.create_model("test_resnet", pretrained=False).eval()
    torch.save(small.state_dict(), folder / "test_resnet.pth")
    timm_transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=small))
    ids = dict(enumerate(HF_LABELS))
    config = transformers.ConvNextConfig(
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_stages=2,
        num_labels=5,
        id2label=ids,
        label2id={v: k for k, v in ids.items()},
    )
    convnext = transformers.ConvNextForImageClassification(config).eval()
    convnext.save_pretrained(folder / "convnext")
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)
    processor.save_pretrained(folder / "convnext")
    tiny = Tiny().eval()
    program = torch.export.export(tiny, (torch.zeros(2, 3, 64, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "tiny.pt2")
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; users still bring its files
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(tiny), folder / "tiny.pt")
    return {
        "folder": folder,
        "resnet18": lambda image: resnet(transform(image)[None])[0],
        "test_resnet": lambda image: small(timm_transform(image)[None])[0],
        "convnext": lambda image: convnext(**processor(images=image, return_tensors="pt")).logits[0],
        "tiny": tiny,
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory, built) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    sources = built["folder"]
    assert imported(repo, sources / "resnet18.pth", "resnet18", "--torchvision", "resnet18") == 0
    assert imported(repo, sources / "test_resnet.pth", "test_resnet", "--timm", "test_resnet") == 0
    assert imported(repo, sources / "convnext", "convnext") == 0
    assert imported(repo, sources / "tiny.pt2", "tiny", "--preset", "imagenet", "--size", "64") == 0
    assert imported(repo, sources / "tiny.pt", "scripted", "--preset", "imagenet", "--size", "64") == 0
    return repo


@pytest.fixture(scope="module")
def server(repo) -> str:
    env = {"CNNSERVE_MODELS_DIR": str(repo), "CNNSERVE_DEFAULT_MODEL": "resnet18", "CNNSERVE_PROCESSES": "1"}
    with live_server(**env) as (url, _):
        yield url


def spec(repo: Path, name: str) -> dict:
    return json.loads((repo / name / "model.json").read_text())


@pytest.mark.parametrize("name", ["resnet18", "test_resnet", "convnext"])
def test_served_answers_equal_the_frameworks(server, built, photos, name):
    for photo in PHOTOS:
        image = ImageOps.exif_transpose(Image.open(photos[photo])).convert("RGB")
        with torch.no_grad():
            logits = built[name](image).double()
        expected = torch.softmax(logits, 0).numpy()
        body = photos[photo].read_bytes()
        response = httpx.post(f"{server}/classify", params={"model": name}, files={"file": (photo, body)}, timeout=30)
        assert response.status_code == 200, response.text
        served = response.json()["predictions"]
        assert [p["index"] for p in served] == np.argsort(-expected)[:5].tolist(), photo
        assert np.allclose([p["score"] for p in served], np.sort(expected)[::-1][:5], atol=2e-3), photo


def test_torchvision_preprocessing_and_labels_come_from_its_weights(repo):
    found = spec(repo, "resnet18")
    assert {k: found["input"][k] for k in ("height", "width", "resize", "interpolation", "color")} == {
        "height": 224,
        "width": 224,
        "resize": 256,
        "interpolation": "bilinear",
        "color": "RGB",
    }
    assert found["input"]["mean"] == on_pixel_scale(IMAGENET_MEAN)
    assert found["labels"] == list(torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"])
    assert found["source"]["framework"].startswith("torchvision ")


def test_timm_preprocessing_comes_from_its_pretrained_cfg(repo):
    found = spec(repo, "test_resnet")["input"]
    assert (found["height"], found["resize"], found["mean"]) == (160, 168, [127.5] * 3)  # floor(160 / 0.95)


def test_hugging_face_labels_and_preprocessing_come_from_the_folder(repo):
    found = spec(repo, "convnext")
    assert found["labels"] == HF_LABELS
    assert (found["input"]["height"], found["input"]["resize"], found["input"]["interpolation"]) == (
        224,
        256,
        "bicubic",
    )


@pytest.mark.parametrize("name", ["tiny", "scripted"])
def test_an_exported_program_and_a_torchscript_file_serve_the_modules_answers(server, repo, built, photos, name):
    """Both files hold Tiny; served, they answer as Tiny does on the tensor the service makes."""
    body = photos["chelsea"].read_bytes()
    tensor = preprocess.prepare(body, InputSpec(**spec(repo, name)["input"]), 10**8)
    with torch.no_grad():
        expected = torch.softmax(built["tiny"](torch.from_numpy(tensor))[0], 0).numpy()
    response = httpx.post(f"{server}/classify", params={"model": name}, files={"file": ("c", body)}, timeout=30)
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    assert [p["index"] for p in served] == np.argsort(-expected)[:5].tolist()
    assert np.allclose([p["score"] for p in served], np.sort(expected)[::-1][:5], atol=1e-4)


def test_check_alone_holds_the_model_to_its_framework(repo, capsys):
    assert run_check(parse_args(["check", "test_resnet", "--models-dir", str(repo)])) == 0
    assert "answers equal to those of timm" in capsys.readouterr().out


def test_a_wrong_channel_order_is_refused_with_the_step_that_differs(tmp_path, built, capsys):
    source = built["folder"] / "resnet18.pth"
    assert imported(tmp_path, source, "bgr", "--torchvision", "resnet18", "--color", "BGR") == 1
    assert "The channel order differs: with RGB they agree" in capsys.readouterr().err
    assert not (tmp_path / "bgr").exists()
