"""A photographed or drawn digit -> the 28x28 field an MNIST-style network was trained on.

model.json's ``input.digit`` asks for it. A digit from a phone or a drawing pad is dark ink on light
paper, off-centre, with margins; MNIST's digits (and those of ``training/digits.py``) are white on
black, scaled into a 20x20 box and centred by their centre of mass in 28x28. This module is the
service's reading of that spec; the training side reads the same spec on its own
(``training.digits.to_field``, as the service never imports training), and
``tests/training/test_digits.py`` holds the two to the same bytes on all 5,000 training digits.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from app.serving.spec import DigitSpec

MIN_CONTRAST = 32
"""Grey levels between paper and ink below which a picture holds no digit (a blank field is given)."""
GRAIN_SIGMAS = 4
"""Ink is at least this many standard deviations of the paper's grain (its median absolute
deviation, scaled) above the paper: where ink is a sliver of a noisy page, Otsu's threshold
would split the grain itself."""
TRIM = 0.005
"""The share of the ink's pixels that may lie outside its bounding box at each side (grain, specks)."""
DRAFT_PIXELS = 512
"""A big JPEG is decoded at reduced scale down to this short side at most: the digit may fill only
part of the photo, and its strokes must survive."""


def field(image: Image.Image, digit: DigitSpec, resample: Image.Resampling) -> Image.Image:
    """The 'L' picture as a ``digit.field``-square 'L' image, white ink on black."""
    gray = np.asarray(image.convert("L"))
    if digit.invert is True or (digit.invert == "auto" and np.median(gray) > 127):
        gray = 255 - gray
    ink = levelled(gray)
    if ink is None:
        return Image.new("L", (digit.field, digit.field))
    levels, mask = ink
    rows, cols = span(mask.sum(1)), span(mask.sum(0))
    crop = levels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return Image.fromarray(centred(scaled(crop, digit.box, resample), digit.field))


def levelled(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Paper to 0 and the strokes' core to 255, with the ink's mask (Otsu's threshold), or None
    where there is no ink. Paper is the median grey; grey up to halfway between paper and the
    threshold becomes 0, which removes the grain of a photographed page."""
    background = float(np.median(gray))
    grain = 1.4826 * float(np.median(np.abs(gray.astype(np.float32) - background)))
    threshold = max(otsu(gray), int(background + GRAIN_SIGMAS * grain))
    mask = gray > threshold
    if not mask.any():
        return None
    core = float(np.median(gray[mask]))
    floor = (background + threshold) / 2
    if core - background < MIN_CONTRAST or core <= floor:
        return None
    levels = np.clip((gray.astype(np.float32) - floor) * (255.0 / (core - floor)), 0, 255)
    return np.floor(levels + 0.5).astype(np.uint8), mask


def span(counts: np.ndarray) -> np.ndarray:
    """The first and last index of the ink's rows (or columns), leaving out at each end what
    holds under TRIM of the ink's pixels: a speck of grain far from the digit moves no edge."""
    cumulative = np.cumsum(counts)
    cut = TRIM * cumulative[-1]
    return np.array([np.searchsorted(cumulative, cut, side="right"), np.searchsorted(cumulative, cumulative[-1] - cut)])


def otsu(gray: np.ndarray) -> int:
    """Otsu's threshold of a uint8 picture: the grey that best splits it into two classes."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return int(np.argmax(np.nan_to_num(between, nan=0.0, posinf=0.0)))


def scaled(crop: np.ndarray, box: int, resample: Image.Resampling) -> np.ndarray:
    """Longer side to ``box``, the shorter in proportion (at least one pixel)."""
    h, w = crop.shape
    factor = box / max(h, w)
    size = (max(1, int(np.floor(w * factor + 0.5))), max(1, int(np.floor(h * factor + 0.5))))
    return np.asarray(Image.fromarray(crop).resize(size, resample))


def centred(digit: np.ndarray, size: int) -> np.ndarray:
    """The digit in a black square with its centre of mass on the square's centre (whole pixels,
    never past an edge)."""
    h, w = digit.shape
    weights = digit.astype(np.float64)
    total = weights.sum()
    out = np.zeros((size, size), np.uint8)
    if total == 0:
        return out
    cy = float((weights.sum(1) * np.arange(h)).sum() / total)
    cx = float((weights.sum(0) * np.arange(w)).sum() / total)
    middle = (size - 1) / 2
    top = min(max(int(np.floor(middle - cy + 0.5)), 0), size - h)
    left = min(max(int(np.floor(middle - cx + 0.5)), 0), size - w)
    out[top : top + h, left : left + w] = digit
    return out
