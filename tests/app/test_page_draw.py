"""The drawing pad, in a real browser: Debian's Chromium driven by Playwright against a real server.
A person draws a digit with a mouse on a desktop or a finger on a phone; the digits model reads it
as they draw, shows the 28x28 it was given, and the feature maps; Clear empties the pad."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from .conftest import CHROMIUM, SCREENSHOTS, shown

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test does it)")
SEVEN = [(0.2, 0.15), (0.8, 0.15), (0.45, 0.9)]  # as fractions of the pad
ONE = [(0.5, 0.1), (0.5, 0.9)]
DESKTOP = {"viewport": {"width": 1000, "height": 1400}}
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 3, "is_mobile": True, "has_touch": True}


def open_page(browser, live_url, device: dict):
    page = browser.new_page(**device)
    page.goto(live_url)
    expect(page.locator("#draw")).to_be_visible(timeout=30_000)
    page.locator("#pad").scroll_into_view_if_needed()
    return page


def on_pad(page, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    box = page.locator("#pad").bounding_box()
    return [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in points]


def draw_with_mouse(page, points: list[tuple[float, float]]) -> None:
    path = on_pad(page, points)
    page.mouse.move(*path[0])
    page.mouse.down()
    for point in path[1:]:
        page.mouse.move(*point, steps=12)
    page.mouse.up()


def draw_with_finger(page, points: list[tuple[float, float]]) -> None:
    """Real touch events through the DevTools protocol (Playwright's touchscreen only taps)."""
    cdp = page.context.new_cdp_session(page)
    path = on_pad(page, points)

    def touch(kind: str, x: float, y: float) -> None:
        points = [] if kind == "touchEnd" else [{"x": x, "y": y}]
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

    touch("touchStart", *path[0])
    for (x0, y0), (x1, y1) in itertools.pairwise(path):
        for t in np.linspace(0, 1, 12)[1:]:
            touch("touchMove", x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)
    touch("touchEnd", 0, 0)


def pad_pixels(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator("#pad").screenshot())).convert("L"))


def read_as(page, digit: str) -> None:
    expect(page.locator("#bars li").first).to_contain_text(digit, timeout=30_000)
    expect(page.locator("#model")).to_have_value("lenet5_digits")
    shown(page, "#given")
    shown(page, "#featuremap")
    assert page.evaluate("document.querySelector('#given').naturalWidth") == 28


def test_a_seven_drawn_with_the_mouse_is_read_and_its_28x28_shown(browser, live_url):
    page = open_page(browser, live_url, DESKTOP)
    draw_with_mouse(page, SEVEN)
    read_as(page, "7")
    assert (pad_pixels(page) < 100).mean() > 0.03, "the stroke is not on the pad"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "draw-desktop.png"), full_page=True)
    page.close()


def test_a_one_drawn_with_a_finger_on_a_phone_is_read_and_clear_empties_the_pad(browser, live_url):
    page = open_page(browser, live_url, PHONE)
    assert page.locator("#pad").bounding_box()["width"] <= 390
    before = page.locator("#pad").bounding_box()["y"]
    draw_with_finger(page, ONE)
    assert abs(page.locator("#pad").bounding_box()["y"] - before) < 1, "the finger scrolled the page, not drew"
    read_as(page, "1")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "draw-phone.png"), full_page=True)
    page.click("#pad-clear")
    expect(page.locator("#given")).to_be_hidden()
    assert (pad_pixels(page)[10:-10, 10:-10] > 200).all(), "the pad still holds ink"
    page.close()
