"""The page's explanation section in a real browser (Debian's Chromium, Playwright) against a real
server, at desktop and phone widths: examples, what the network was given, the method picker and
the first convolution worked by hand. Screenshots of the section are kept and checked."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from .conftest import CHROMIUM, SCREENSHOTS, shown

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test does it)")
WIDTHS = {"desktop": {"width": 1100, "height": 1400}, "phone": {"width": 390, "height": 844}}


def open_page(browser, live_url, width: str):
    page = browser.new_page(viewport=WIDTHS[width], is_mobile=width == "phone")
    page.goto(live_url)
    expect(page.locator("#model")).to_have_value("efficientnet_lite0", timeout=30_000)
    return page


def section_screenshot(page, name: str) -> Image.Image:
    """The section as a picture, kept under runs/screenshots, with enough colours to hold a map."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    png = page.locator("#explain").screenshot(path=str(SCREENSHOTS / f"explain-{name}.png"))
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = len(np.unique(np.asarray(image).reshape(-1, 3), axis=0))
    assert colours > 500, colours  # a blank or unstyled section has a few dozen
    return image


def by_hand_and_served(page) -> tuple[float, float]:
    text = page.locator("#lecture-sum").inner_text()
    found = re.search(r"= (-?\d+\.\d+) by hand; the network computed (-?\d+\.\d+)", text)
    assert found, text
    return float(found.group(1)), float(found.group(2))


def test_a_fashion_example_explained_on_a_desktop(browser, live_url):
    page = open_page(browser, live_url, "desktop")
    page.select_option("#model", "resnet")
    example = page.locator("#explain-examples button[title='Sneaker']")
    expect(example).to_be_visible(timeout=30_000)
    example.click()
    expect(page.locator("#bars li").first).to_contain_text("Sneaker", timeout=30_000)
    shown(page, "#explain-given")
    shown(page, "#explain-map")
    expect(page.locator("#explain-given-caption")).to_contain_text("28x28, grey")
    expect(page.locator("#explain-caption")).to_contain_text("gradcam at layer3.1.relu2", timeout=30_000)
    expect(page.locator("#lecture-sum")).to_contain_text("by hand", timeout=30_000)
    by_hand, served = by_hand_and_served(page)
    assert abs(by_hand - served) < 1e-3
    expect(page.locator("#lecture-formula")).to_contain_text("(N + 2P - F) / S + 1")
    section_screenshot(page, "desktop")
    page.close()


def test_the_method_picker_and_a_click_on_the_input_move_the_view(browser, live_url):
    page = open_page(browser, live_url, "desktop")
    page.select_option("#model", "lenet5")
    page.locator("#explain-examples button[title='Trouser']").click()
    shown(page, "#explain-map")
    expect(page.locator("#explain-caption")).to_contain_text("gradcam", timeout=30_000)
    before = page.locator("#explain-map").get_attribute("src")
    page.select_option("#explain-method", "occlusion")
    expect(page.locator("#explain-caption")).to_contain_text("occlusion (a grey square", timeout=30_000)
    assert page.locator("#explain-map").get_attribute("src") != before
    expect(page.locator("#explain-layer")).to_be_disabled()
    expect(page.locator("#lecture-sum")).to_contain_text("by hand", timeout=30_000)
    page.locator("#explain-given").click(position={"x": 150, "y": 100})
    expect(page.locator("#lecture-sum")).not_to_contain_text("Output (0, 0)", timeout=30_000)
    by_hand, served = by_hand_and_served(page)
    assert abs(by_hand - served) < 1e-3
    page.close()


def test_a_photo_example_explained_on_a_phone(browser, live_url):
    page = open_page(browser, live_url, "phone")
    page.locator("#explain-examples button[title='chelsea']").click()
    expect(page.locator("#bars")).to_contain_text("cat", timeout=60_000)
    shown(page, "#explain-map")
    expect(page.locator("#explain-given-caption")).to_contain_text("224x224, colour")
    expect(page.locator("#lecture-sum")).to_contain_text("input channel 1 shown", timeout=60_000)
    by_hand, served = by_hand_and_served(page)
    assert abs(by_hand - served) < 1e-3
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than the phone"
    assert section_screenshot(page, "phone").width <= 390
    page.close()
