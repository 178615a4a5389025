"""OpenCV's handwritten digits (Debian's opencv-doc), normalised as MNIST was made, and split.

``digits.png`` is a 2000x1000 sheet of 5,000 white-on-black digits in 20x20 cells, 100 to a row:
rows 0-4 hold the 500 zeros, rows 5-9 the ones, and so on (OpenCV's ``samples/python/digits.py``
reads it the same way). Each digit is brought to what the served model receives by
:func:`to_field`, the training side's reading of model.json's ``input.digit`` (the service applies
the same spec in ``app/serving/preprocess.py`` on its own, as it never imports training; the
tests hold the two to the same bytes on all 5,000 digits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import DatasetMissing, Split

DEBIAN_PACKAGE = "opencv-doc"
DEFAULT_PATH = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
NAME = "lenet5_digits"
LABELS = [str(d) for d in range(10)]
CELL = 20
PER_ROW = 100
PER_CLASS = 500
TEST_PER_CLASS = 100
SPLIT_SEED = 0
BOX, FIELD = 20, 28
MIN_CONTRAST = 32  # grey levels between paper and ink below which a picture holds no digit
GRAIN_SIGMAS = 4  # ink is at least this many standard deviations of the paper's grain above the paper
TRIM = 0.005  # the share of the ink's pixels that may lie outside its bounding box at each side
# The 4,000 training digits' statistics after to_field, on the 0..255 scale (python -m training.digits).
DIGITS_MEAN = 32.97
DIGITS_STD = 72.35
INPUT = {
    "name": "input",
    "layout": "NCHW",
    "color": "L",
    "height": FIELD,
    "width": FIELD,
    "resize": None,
    "interpolation": "bilinear",
    "mean": [DIGITS_MEAN],
    "std": [DIGITS_STD],
    "digit": {"invert": "auto", "box": BOX, "field": FIELD, "centre": "mass"},
}


def read_sheet(path: Path = DEFAULT_PATH) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 cells as uint8 (5000, 20, 20), white ink on black, and their labels 0-9."""
    if not path.exists():
        raise DatasetMissing(
            f"{path} not found. Install the Debian package '{DEBIAN_PACKAGE}' (apt-get install "
            f"{DEBIAN_PACKAGE}, or make dataset) or pass --digits with OpenCV's samples/data/digits.png."
        )
    sheet = np.asarray(Image.open(path).convert("L"))
    rows, cols = sheet.shape[0] // CELL, sheet.shape[1] // CELL
    if (rows * CELL, cols * CELL) != sheet.shape or cols != PER_ROW or rows * cols != 10 * PER_CLASS:
        raise ValueError(f"{path}: {sheet.shape[1]}x{sheet.shape[0]} is not OpenCV's 2000x1000 sheet of digits")
    cells = sheet.reshape(rows, CELL, cols, CELL).transpose(0, 2, 1, 3).reshape(-1, CELL, CELL)
    return np.ascontiguousarray(cells), np.repeat(np.arange(10, dtype=np.int64), PER_CLASS)


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The fixed split: per class, a seeded permutation's first 100 digits are held out for the
    test, the other 400 train (4,000 / 1,000 in all, every class 80 / 20)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test.append(members[:TEST_PER_CLASS])
        train.append(members[TEST_PER_CLASS:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_splits(path: Path = DEFAULT_PATH) -> tuple[Split, Split]:
    """(train, test), every digit already normalised into its 28x28 field."""
    cells, labels = read_sheet(path)
    fields = np.stack([to_field(cell) for cell in cells])
    train, test = split_indices(labels)
    return Split(fields[train], labels[train]), Split(fields[test], labels[test])


# -- the normalisation model.json's input.digit names ----------------------------------------------


def to_field(gray: np.ndarray, invert: bool | str = "auto", box: int = BOX, field: int = FIELD) -> np.ndarray:
    """A grey picture holding one digit -> uint8 (field, field), white ink on black, as MNIST was
    made: ink made white, levelled, cropped to its bounding box, scaled (aspect kept) so its longer
    side is ``box``, then placed so that its centre of mass falls on the field's centre."""
    if invert is True or (invert == "auto" and np.median(gray) > 127):
        gray = 255 - gray
    ink = levelled(gray)
    if ink is None:
        return np.zeros((field, field), np.uint8)
    levels, mask = ink
    rows, cols = span(mask.sum(1)), span(mask.sum(0))
    crop = levels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return centred(scaled(crop, box), field)


def levelled(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Paper to 0 and the strokes' core to 255, with the ink's mask (Otsu's threshold), or None
    where there is no ink. Paper is the median grey; grey halfway between paper and the threshold
    and below is set to 0, which removes the noise of a photographed page."""
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
    scaled_levels = np.clip((gray.astype(np.float32) - floor) * (255.0 / (core - floor)), 0, 255)
    return np.floor(scaled_levels + 0.5).astype(np.uint8), mask


def span(counts: np.ndarray) -> np.ndarray:
    """The first and last index of the ink's rows (or columns), leaving out at each end what
    holds under TRIM of the ink's pixels: a speck of grain far from the digit moves no edge."""
    cumulative = np.cumsum(counts)
    cut = TRIM * cumulative[-1]
    return np.array([np.searchsorted(cumulative, cut, side="right"), np.searchsorted(cumulative, cumulative[-1] - cut)])


def otsu(gray: np.ndarray) -> int:
    """Otsu's threshold on a uint8 picture: the grey that best splits it into two classes."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return int(np.argmax(np.nan_to_num(between, nan=0.0, posinf=0.0)))


def scaled(crop: np.ndarray, box: int) -> np.ndarray:
    """Longer side to ``box``, shorter in proportion (at least one pixel), bilinear."""
    h, w = crop.shape
    factor = box / max(h, w)
    size = (max(1, int(np.floor(w * factor + 0.5))), max(1, int(np.floor(h * factor + 0.5))))
    return np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR))


def centred(digit: np.ndarray, field: int) -> np.ndarray:
    """The digit pasted into a black field with its centre of mass on the field's centre (whole
    pixels, and never past an edge)."""
    h, w = digit.shape
    weights = digit.astype(np.float64)
    total = weights.sum()
    out = np.zeros((field, field), np.uint8)
    if total == 0:
        return out
    cy = float((weights.sum(1) * np.arange(h)).sum() / total)
    cx = float((weights.sum(0) * np.arange(w)).sum() / total)
    middle = (field - 1) / 2
    top = min(max(int(np.floor(middle - cy + 0.5)), 0), field - h)
    left = min(max(int(np.floor(middle - cx + 0.5)), 0), field - w)
    out[top : top + h, left : left + w] = digit
    return out


@dataclass(frozen=True)
class Statistics:
    mean: float
    std: float


def statistics(path: Path = DEFAULT_PATH) -> Statistics:
    """Mean and std of the training digits' fields, the values DIGITS_MEAN and DIGITS_STD hold."""
    train, _ = load_splits(path)
    pixels = train.images.astype(np.float64)
    return Statistics(round(float(pixels.mean()), 2), round(float(pixels.std()), 2))


if __name__ == "__main__":
    print(statistics())
