"""/explain with no layer: each method gets the deepest layer whose forward passes fit
CNNSERVE_MAX_EXPLAIN_PASSES, and the answer says which one."""

from __future__ import annotations

import shutil

import pytest
from playwright.sync_api import expect

from app.config import Settings

from ..conftest import MODELS, running_client
from .conftest import CHROMIUM


def explain(client, image: bytes, **query):
    return client.post("/explain", params=query, files={"file": ("image.png", image, "image/png")})


@pytest.fixture(scope="module")
def efficient_layers(client) -> dict:
    return client.get("/models/efficientnet_lite0/layers").json()


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_per_channel_methods_on_efficientnet_answer_without_a_layer(client, photos, efficient_layers, method):
    response = explain(client, photos["chelsea"].read_bytes(), model="efficientnet_lite0", method=method, format="json")
    assert response.status_code == 200, response.text
    layer = response.json()["layer"]
    assert layer == response.headers["x-layer"] == efficient_layers["explain_layers"][method]
    passes = {entry["name"]: entry["passes"] for entry in efficient_layers["layers"]}
    assert passes[layer][method] <= efficient_layers["max_passes"]


def test_the_chosen_layer_is_the_deepest_that_fits(efficient_layers):
    names = [layer["name"] for layer in efficient_layers["layers"]]
    chosen = efficient_layers["explain_layers"]["scorecam"]
    deeper = [
        layer
        for layer in efficient_layers["layers"][names.index(chosen) + 1 :]
        if layer["stage"] != "pooling" and layer["output_shape"][1] > 1
    ]
    assert deeper and all(layer["passes"]["scorecam"] > efficient_layers["max_passes"] for layer in deeper)


def test_one_pass_methods_keep_the_layer_the_head_reads(efficient_layers):
    chosen = efficient_layers["explain_layers"]
    assert chosen["gradcam"] == chosen["eigencam"] == efficient_layers["explain_layer"]
    assert chosen["scorecam"] != efficient_layers["explain_layer"]


def test_a_lower_limit_moves_the_default_to_a_narrower_layer(tmp_path):
    shutil.copytree(MODELS / "lenet5", tmp_path / "lenet5")
    settings = Settings(models_dir=tmp_path, max_explain_passes=15, default_model="lenet5")
    with running_client(settings) as client:
        listing = client.get("/models/lenet5/layers").json()
        assert listing["explain_layer"] == "features.relu2"  # 16 channels: 17 passes
        assert listing["explain_layers"]["scorecam"] == "features.relu1"  # 6 channels: 7 passes
        assert listing["explain_layers"]["gradcam"] == "features.relu2"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test does it)")
def test_the_page_moves_a_costly_method_to_its_own_layer(browser, live_url):
    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    page.goto(live_url)
    expect(page.locator("#model")).to_have_value("efficientnet_lite0", timeout=30_000)
    page.locator("#explain-examples button[title='chelsea']").click()
    expect(page.locator("#explain-caption")).to_contain_text("gradcam at _swish#2", timeout=60_000)
    page.select_option("#explain-method", "scorecam")
    expect(page.locator("#explain-layer")).to_have_value("_blocks.15._bn2")
    expect(page.locator("#explain-caption")).to_contain_text("scorecam at _blocks.15._bn2", timeout=120_000)
    page.close()
