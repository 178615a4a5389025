"""GET /models/{name}/layers/{layer}/exemplars on the real models folder: the test images that excite
a channel most, with patches cut from the images the file stores."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from training.data import load_split

from .conftest import CHROMIUM, shown

URL = "/models/{model}/layers/{layer}/exemplars"
SNEAKER = Path(__file__).resolve().parents[2] / "app" / "static" / "examples" / "fashion-7.png"


def pixels(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))))


def exemplars(client, model: str = "lenet5", layer: str = "features.conv1", **query):
    return client.get(URL.format(model=model, layer=layer), params=query)


def test_a_channel_has_nine_exemplars_best_first(client):
    body = exemplars(client, channel=2).json()
    assert body["model"] == "lenet5" and body["layer"] == "features.conv1" and body["channel"] == 2
    assert body["channels"] == 6 and body["receptive_field"] == 5
    activations = [entry["activation"] for entry in body["exemplars"]]
    assert len(activations) == 9 and activations == sorted(activations, reverse=True)


def test_the_images_are_the_test_images_and_the_patches_their_boxes(client):
    test = load_split("test").images
    for entry in exemplars(client, layer="features.conv2", channel=5).json()["exemplars"]:
        image = pixels(entry["image"])
        np.testing.assert_array_equal(image, test[entry["index"]])
        top, left, bottom, right = entry["box"]
        np.testing.assert_array_equal(pixels(entry["patch"]), image[top:bottom, left:right])


def test_every_convolution_the_layers_route_lists_has_exemplars(client):
    listed = client.get("/models/lenet5/layers").json()["layers"]
    for layer in [entry["name"] for entry in listed if entry["stage"] == "convolution"]:
        assert exemplars(client, layer=layer).status_code == 200


def test_the_picture_is_a_3x3_grid_of_patches(client):
    response = exemplars(client, channel=0, format="png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (256, 256)


@pytest.mark.parametrize(
    ("model", "layer", "channel"),
    [
        ("efficientnet_lite0", "_conv_stem", 0),  # a model without the file
        ("no_such_model", "features.conv1", 0),
        ("lenet5", "features.relu1", 0),  # not a convolution
        ("lenet5", "features.conv1", 6),  # conv1 has channels 0-5
    ],
)
def test_what_does_not_exist_is_404(client, model, layer, channel):
    response = exemplars(client, model=model, layer=layer, channel=channel)
    assert response.status_code == 404 and response.json()["detail"]


@pytest.mark.parametrize("channel", ["-1", "two", "1.5"])
def test_a_bad_channel_is_422(client, channel):
    assert exemplars(client, channel=channel).status_code == 422


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test does it)")
def test_the_page_shows_the_chosen_channels_exemplars_under_the_feature_maps(browser, live_url):
    page = browser.new_page(viewport={"width": 1000, "height": 1400})
    page.goto(live_url)
    expect(page.locator("#model")).to_have_value("efficientnet_lite0", timeout=30_000)
    # the default model's layer list, arriving after LeNet-5's, would replace it: let it come first
    expect(page.locator("#layer option")).not_to_have_count(0, timeout=60_000)
    page.select_option("#model", "lenet5")
    expect(page.locator("#layer option").first).to_contain_text("features.conv1", timeout=30_000)
    page.set_input_files("#file", SNEAKER)
    shown(page, "#excite-grid")
    expect(page.locator("#excite-caption")).to_contain_text("channel 0 of features.conv1")
    page.select_option("#excite-channel", "3")
    expect(page.locator("#excite-caption")).to_contain_text("channel 3 of features.conv1", timeout=30_000)
    page.click("#next")  # features.relu1: not a convolution
    expect(page.locator("#excite")).to_be_hidden(timeout=30_000)
    page.close()
