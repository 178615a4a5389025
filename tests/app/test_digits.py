"""Handwritten digits as people send them: drawn with Pillow in strokes of several widths, dark on
light or light on dark, anywhere on a larger page, photographed with grain, through a real
/classify of the digits model, which the service must first turn into what the network was
trained on (model.json's input.digit; app/serving/digits.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image

from app.serving import preprocess
from app.serving.spec import InputSpec
from training.digits_drawn import Pen, page

from ..conftest import MODELS

MODEL = "lenet5_digits"
SPEC = InputSpec(**json.loads((MODELS / MODEL / "model.json").read_text())["input"])


def drawn(digit: int, fmt: str = "PNG", **pen: object) -> bytes:
    """``digit`` written with the pen of training/digits_drawn.py on a page, as an image file."""
    buffer = io.BytesIO()
    page(digit, Pen(**pen), seed=digit).save(buffer, format=fmt)
    return buffer.getvalue()


WAYS = {
    "pad": {},
    "thin pen": {"width": 6},
    "thick marker": {"width": 30},
    "small, in a corner of a big page": {"page": (900, 700), "box": (620, 430, 180), "width": 12},
    "white chalk on a blackboard": {"ink": 235, "paper": 30, "width": 16},
    "slanted and turned": {"slant": 0.3, "turn": -10, "width": 14},
    "photo of a page": {
        "page": (640, 480),
        "box": (90, 150, 260),
        "ink": 70,
        "paper": 205,
        "grain": 14,
        "blur": 1.5,
        "fmt": "JPEG",
        "width": 20,
    },
}


@pytest.mark.parametrize("way", sorted(WAYS))
def test_every_digit_written_this_way_is_read(client, way):
    answers = {}
    for digit in range(10):
        response = client.post(f"/classify?model={MODEL}&top_k=1", files={"file": drawn(digit, **WAYS[way])})
        assert response.status_code == 200, response.text
        answers[digit] = int(response.json()["predictions"][0]["label"])
    assert answers == {d: d for d in range(10)}


def test_the_network_is_given_the_digit_white_on_black_centred_in_a_20_pixel_box(client):
    response = client.post(f"/preprocess?model={MODEL}", files={"file": drawn(4, **WAYS["photo of a page"])})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    given = np.asarray(Image.open(io.BytesIO(response.content)))
    assert given.shape == (28, 28) and given[0].max() == 0 and given[:, 0].max() == 0
    rows, cols = np.flatnonzero(given.any(1)), np.flatnonzero(given.any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == 20
    mass = given.astype(float) / given.sum()
    assert abs((mass.sum(1) * np.arange(28)).sum() - 13.5) <= 0.5
    assert abs((mass.sum(0) * np.arange(28)).sum() - 13.5) <= 0.5


def test_the_same_digit_gives_the_same_field_whatever_the_polarity():
    dark_on_light = np.asarray(preprocess.fit(drawn(3), SPEC, 10**6))
    light_on_dark = np.asarray(preprocess.fit(drawn(3, ink=255 - 20, paper=0), SPEC, 10**6))
    assert np.array_equal(dark_on_light, light_on_dark)


def test_a_blank_page_gives_an_empty_field_and_still_an_answer(client):
    blank = drawn(1, width=1, ink=250, paper=250, grain=3)
    assert not np.asarray(preprocess.fit(blank, SPEC, 10**6)).any()
    response = client.post(f"/classify?model={MODEL}", files={"file": blank})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 5


def test_a_digit_spec_that_cannot_fit_its_input_is_refused():
    fields = {**SPEC.model_dump(), "digit": {**SPEC.digit.model_dump(), "field": 32}}  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="field"):
        InputSpec(**fields)
    with pytest.raises(ValueError, match="colour mode L"):
        InputSpec(**{**SPEC.model_dump(), "color": "RGB", "mean": [0.0] * 3, "std": [1.0] * 3})


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40)))
def test_any_picture_at_all_becomes_a_field(pixels):
    """One pixel, one line, flat, noise: whatever the picture, a 28x28 field and no error."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    assert np.asarray(preprocess.fit(buffer.getvalue(), SPEC, 10**6)).shape == (28, 28)
