"""The web page at /, in a real browser: Debian's Chromium driven by Playwright against a real
server. A person uploads a photo, sees the bars, steps through the layers."""

import httpx
import pytest
from playwright.sync_api import expect

from ..conftest import live_server
from .conftest import CHROMIUM, SCREENSHOTS, shown

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test does it)")


@pytest.fixture(scope="module")
def page(browser, live_url):
    page = browser.new_page(viewport={"width": 1000, "height": 1400})
    page.goto(live_url)
    yield page
    page.close()


def test_the_page_lists_the_models_with_the_default_chosen(page):
    expect(page.locator("#model")).to_have_value("efficientnet_lite0")
    names = page.locator("#model option").all_inner_texts()
    assert {"lenet5", "kernels", "efficientnet_lite0"} <= set(names)
    expect(page.locator("#model-list")).to_contain_text("lenet5: version 1 ready")


def test_a_photo_gives_bars_with_a_cat_feature_maps_and_a_cam(page, photos):
    page.set_input_files("#file", photos["chelsea"])
    bars = page.locator("#bars li")
    expect(bars).to_have_count(5, timeout=30_000)
    assert "cat" in bars.first.inner_text()
    shown(page, "#featuremap")
    expect(page.locator("#cam-section")).to_be_visible()
    shown(page, "#cam")


def test_stepping_to_the_next_layer_shows_its_maps(page):
    before = page.locator("#featuremap").get_attribute("src")
    page.click("#next")
    expect(page.locator("#layer")).to_have_value("1")
    expect(page.locator("#featuremap")).not_to_have_attribute("src", before, timeout=30_000)
    shown(page, "#featuremap")
    expect(page.locator("#layer-info")).to_contain_text("output")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "page.png"), full_page=True)
    assert (SCREENSHOTS / "page.png").stat().st_size > 10_000


def test_a_model_without_cam_hides_it_and_errors_are_shown(page):
    page.select_option("#model", "kernels")
    expect(page.locator("#cam-section")).to_be_hidden(timeout=30_000)
    expect(page.locator("#layer option").first).to_contain_text("conv")
    page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"})
    expect(page.locator("#status")).to_contain_text("415", timeout=30_000)


def test_a_photo_chosen_with_a_new_model_waits_for_that_models_layers(page, photos):
    page.evaluate(
        """() => { window.said = [];
        new MutationObserver(() => window.said.push(document.querySelector('#status').textContent))
            .observe(document.querySelector('#status'), {childList: true, characterData: true, subtree: true}); }"""
    )
    held = []  # the new model's layer list is held back, as on a slow network, until the photo is classified
    page.route("**/models/googlenet/layers", lambda route: held.append(route))
    page.select_option("#model", "googlenet")
    page.set_input_files("#file", photos["coffee"])
    expect(page.locator("#bars li").first).to_contain_text("Bag", timeout=30_000)
    page.wait_for_timeout(300)
    assert held, "the page never asked for the new model's layers"
    for route in held:
        route.continue_()
    expect(page.locator("#layer option").first).to_contain_text("stem.conv1", timeout=30_000)
    shown(page, "#featuremap")
    assert not [text for text in page.evaluate("window.said") if "404" in text]


def test_a_model_loaded_or_unloaded_while_the_page_is_open_shows_without_a_reload(browser, repo_copy):
    """As `cnnserve import --url` does: a model loaded through the repository API appears in the
    open page's list, and goes again when unloaded, while the chosen model stays chosen."""
    env = {
        "CNNSERVE_MODELS_DIR": str(repo_copy),
        "CNNSERVE_DEFAULT_MODEL": "lenet5",
        "CNNSERVE_MODEL_CONTROL": "explicit",
        "CNNSERVE_LOAD_MODELS": "lenet5",
        "CNNSERVE_PROCESSES": "1",
    }
    with live_server(**env) as (url, _):
        page = browser.new_page()
        try:
            page.goto(url)
            options = page.locator("#model option")
            expect(options).to_have_text(["lenet5"], timeout=30_000)
            assert httpx.post(f"{url}/v2/repository/models/kernels/load", timeout=60).status_code == 200
            expect(options).to_have_text(["kernels", "lenet5"], timeout=15_000)
            expect(page.locator("#model-list")).to_contain_text("kernels: version 1 ready")
            expect(page.locator("#model")).to_have_value("lenet5")
            assert httpx.post(f"{url}/v2/repository/models/kernels/unload", timeout=60).status_code == 200
            expect(options).to_have_text(["lenet5"], timeout=15_000)
        finally:
            page.close()
