"""POST /explain and the methods /models/{name}/layers lists, on the real models and real images."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from app.config import Settings
from training.data import load_split

from ..conftest import MODELS, png_bytes, running_client

FASHION = ("lenet5", "alexnet", "googlenet", "resnet")
LAYER_METHODS = ("gradcam", "scorecam", "ablationcam", "eigencam")
# EfficientNet-Lite0's narrowest early layer keeps Score-CAM and Ablation-CAM cheap in tests
EFFICIENT_LAYER = "_blocks.0._bn2"


@pytest.fixture(scope="module")
def sneaker() -> bytes:
    split = load_split("test")
    return png_bytes(Image.fromarray(split.images[int(np.flatnonzero(split.labels == 7)[0])]))


def explain(client, image: bytes, **query):
    return client.post("/explain", params=query, files={"file": ("image.png", image, "image/png")})


def explained(client, image: bytes, **query) -> dict:
    response = explain(client, image, format="json", **query)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("model", FASHION)
@pytest.mark.parametrize("method", [*LAYER_METHODS, "occlusion"])
def test_every_method_answers_for_every_fashion_network(client, sneaker, model, method):
    body = explained(client, sneaker, model=model, method=method)
    heat = np.array(body["map"])
    assert body["shape"] == [28, 28] and heat.shape == (28, 28)
    assert heat.min() >= 0 and heat.max() <= 1 and heat.max() == 1
    assert body["label"] == "Sneaker" and body["class_index"] == 7
    assert (body["layer"] is None) == (method == "occlusion")


@pytest.mark.parametrize("method", [*LAYER_METHODS, "occlusion"])
def test_every_method_answers_for_efficientnet_lite0(client, photos, method):
    query: dict = {"layer": EFFICIENT_LAYER} if method in ("scorecam", "ablationcam") else {}
    if method == "occlusion":
        query = {"window": 56, "stride": 56}
    body = explained(client, photos["chelsea"].read_bytes(), model="efficientnet_lite0", method=method, **query)
    heat = np.array(body["map"])
    assert heat.shape == (224, 224) and heat.max() == 1 and heat.min() >= 0
    assert body["label"] in ("tiger cat", "Egyptian Mau", "tabby cat")


def test_the_png_is_the_map_over_the_photo_the_model_saw(client, photos):
    response = explain(client, photos["chelsea"].read_bytes(), model="efficientnet_lite0", method="eigencam")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (224, 224)
    assert response.headers["x-method"] == "eigencam" and response.headers["x-layer"] == "_swish#2"


def test_a_named_class_and_layer_are_explained(client, sneaker):
    body = explained(client, sneaker, model="resnet", method="gradcam", class_index=9, layer="layer2.1.relu2")
    assert body["class_index"] == 9 and body["label"] == "Ankle boot" and body["layer"] == "layer2.1.relu2"
    assert 0 < body["score"] < 1


def test_gradcam_differs_between_classes(client, sneaker):
    """A class-discriminative method: the evidence for Sneaker and for Trouser lie apart."""
    first = np.array(explained(client, sneaker, model="resnet", class_index=7)["map"])
    second = np.array(explained(client, sneaker, model="resnet", class_index=1)["map"])
    assert np.abs(first - second).mean() > 0.05


def test_layers_say_which_methods_each_layer_takes(client):
    listing = client.get("/models/resnet/layers").json()
    assert listing["methods"] == ["gradcam", "scorecam", "ablationcam", "eigencam", "occlusion"]
    assert listing["explain_layer"] == "layer3.1.relu2"
    last = next(layer for layer in listing["layers"] if layer["name"] == "layer3.1.relu2")
    assert last["methods"] == list(LAYER_METHODS)
    assert last["passes"] == {"gradcam": 1, "scorecam": 129, "ablationcam": 129, "eigencam": 1}


def test_efficientnet_gradcam_reaches_every_layer(client):
    layers = client.get("/models/efficientnet_lite0/layers").json()["layers"]
    assert all("gradcam" in layer["methods"] for layer in layers)


def test_more_passes_than_allowed_is_a_clear_422(sneaker, tmp_path):
    shutil.copytree(MODELS / "lenet5", tmp_path / "lenet5")
    with running_client(Settings(models_dir=tmp_path, max_explain_passes=15, default_model="lenet5")) as client:
        response = explain(client, sneaker, method="scorecam", layer="features.relu2")
        assert response.status_code == 422
        assert "17 forward passes; the limit is 15" in response.json()["detail"]
        assert explain(client, sneaker, method="occlusion", window=10, stride=9).status_code == 200
        assert explain(client, sneaker, method="occlusion").status_code == 422
        assert explain(client, sneaker, method="scorecam", layer="features.relu1").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_a_model_at_capacity_refuses_with_429(client, sneaker):
    batcher = client.app.state.services.repository.get("lenet5").batcher
    with batcher.admission(cost=batcher.capacity):
        response = explain(client, sneaker, model="lenet5", method="occlusion")
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert explain(client, sneaker, model="lenet5", method="occlusion").status_code == 200


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ({"method": "lime"}, 422),
        ({"layer": "no.such.layer"}, 404),
        ({"class_index": 10}, 422),
        ({"model": "nope"}, 404),
        ({"window": 0}, 422),
    ],
)
def test_bad_requests_are_4xx(client, sneaker, query, status):
    response = explain(client, sneaker, **{"model": "lenet5", **query})
    assert response.status_code == status, response.text
    assert "detail" in response.json()


def test_an_undecodable_image_is_400(client):
    assert explain(client, b"not an image", model="lenet5").status_code == 400


def test_the_json_map_is_plain_numbers_in_range(client, sneaker):
    response = explain(client, sneaker, model="lenet5", method="gradcam", format="json")
    body = json.loads(response.content)
    assert set(body) == {"model", "method", "layer", "class_index", "label", "score", "shape", "map"}


@pytest.mark.parametrize(("model", "shape"), [("lenet5", [6, 1, 5, 5]), ("efficientnet_lite0", [32, 3, 3, 3])])
def test_the_first_convolutions_kernels_come_as_numbers_and_a_picture(client, model, shape):
    body = client.get(f"/models/{model}/kernels", params={"format": "json"}).json()
    assert body["shape"] == shape and np.array(body["weights"]).shape == tuple(shape)
    assert len(body["bias"]) == shape[0] and body["layer"]["formula"].startswith("(N + 2P - F) / S + 1")
    picture = client.get(f"/models/{model}/kernels")
    assert picture.headers["content-type"] == "image/png"
    columns = int(np.ceil(np.sqrt(shape[0])))
    assert Image.open(io.BytesIO(picture.content)).width > columns * 50


def test_kernels_times_the_given_patch_is_the_first_convolutions_output(client, sneaker):
    """The lecture's arithmetic by hand: kernel x input patch + bias = the served feature map value."""
    kernel = client.get("/models/lenet5/kernels", params={"format": "json"}).json()
    given = client.post("/explain/input", params={"model": "lenet5"}, files={"file": ("s.png", sneaker)}).json()
    maps = client.post(
        "/featuremaps",
        params={
            "model": "lenet5",
            "layer": kernel["layer"]["name"],
            "format": "json",
            "values": "true",
            "channels": "2",
        },
        files={"file": ("s.png", sneaker)},
    ).json()
    x = np.pad(np.array(given["values"][0]), 2)  # LeNet-5's first convolution pads by 2
    row, col = 14, 9
    patch = x[row : row + 5, col : col + 5]
    by_hand = float((np.array(kernel["weights"][2][0]) * patch).sum() + kernel["bias"][2])
    assert abs(by_hand - maps["values"][0][row][col]) < 1e-3
