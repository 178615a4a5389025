"""OpenCV's handwritten digits: the reader, the split, the normalisation the service shares, the
augmentation, and the exported model's accuracy on the held-out digits."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.serving import preprocess
from app.serving.spec import InputSpec
from training import digits, digits_train

from ..conftest import MODELS, png_bytes

pytestmark = pytest.mark.skipif(not digits.DEFAULT_PATH.exists(), reason="opencv-doc is not installed (make dataset)")
MODEL = MODELS / digits.NAME


@pytest.fixture(scope="module")
def sheet():
    return digits.read_sheet()


@pytest.fixture(scope="module")
def splits():
    return digits.load_splits()


def test_the_sheet_holds_500_white_on_black_digits_of_each_class_in_order(sheet):
    cells, labels = sheet
    assert cells.shape == (5000, 20, 20) and cells.dtype == np.uint8
    assert np.array_equal(np.bincount(labels), [500] * 10)
    assert labels[499] == 0 and labels[500] == 1 and labels[-1] == 9
    assert np.median(cells) == 0 and cells.max() == 255


def test_the_split_is_fixed_stratified_and_disjoint(sheet):
    _, labels = sheet
    train, test = digits.split_indices(labels)
    again_train, again_test = digits.split_indices(labels)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert len(train) == 4000 and len(test) == 1000 and not set(train) & set(test)
    assert np.array_equal(np.bincount(labels[test]), [100] * 10)


def test_the_services_preprocessing_gives_every_dataset_digit_the_training_bytes(sheet, splits):
    """What the service makes of a digit's cell sent as a PNG is what training saw, bit for bit,
    for all 5,000 digits: the two readings of model.json's input.digit cannot drift apart."""
    cells, labels = sheet
    spec = InputSpec(**digits.INPUT)
    served = np.stack([np.asarray(preprocess.fit(png_bytes_of(cell), spec, 10_000)) for cell in cells])
    assert np.array_equal(served, np.stack([digits.to_field(cell) for cell in cells]))
    train, test = digits.split_indices(labels)
    assert np.array_equal(served[test], splits[1].images) and np.array_equal(served[train], splits[0].images)


def test_the_served_tensor_is_the_training_tensor(sheet):
    cell = sheet[0][1234]
    tensor = preprocess.prepare(png_bytes_of(cell), InputSpec(**digits.INPUT), 10_000)
    expected = digits_train.normalise(digits.to_field(cell)[None]).numpy()
    np.testing.assert_allclose(tensor, expected, rtol=0, atol=1e-6)


def test_the_normalisation_centres_the_ink_by_mass_in_a_20_pixel_box(splits):
    fields = splits[0].images.astype(np.float64)
    mass = fields.sum((1, 2))
    cy = (fields.sum(2) * np.arange(28)).sum(1) / mass
    cx = (fields.sum(1) * np.arange(28)).sum(1) / mass
    assert np.abs(cy - 13.5).max() <= 0.5 and np.abs(cx - 13.5).max() <= 0.5
    rows, cols = (fields > 0).any(2), (fields > 0).any(1)
    assert rows.sum(1).max() == 20 or cols.sum(1).max() == 20
    assert max(rows.sum(1).max(), cols.sum(1).max()) <= 20


def test_the_recorded_mean_and_std_are_the_training_digits(splits):
    pixels = splits[0].images.astype(np.float64)
    assert round(float(pixels.mean()), 2) == digits.DIGITS_MEAN
    assert round(float(pixels.std()), 2) == digits.DIGITS_STD


def test_dark_ink_on_light_paper_is_inverted_and_a_blank_page_gives_a_black_field(sheet):
    cell = sheet[0][2600]
    assert np.array_equal(digits.to_field(255 - cell), digits.to_field(cell))
    assert not digits.to_field(np.full((40, 40), 200, np.uint8)).any()


@pytest.mark.parametrize("level", digits_train.LEVELS)
def test_each_augmentation_level_keeps_the_digit_and_none_changes_nothing(splits, level):
    x = digits_train.normalise(splits[0].images[:64])
    out = digits_train.Distortion(level)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    if level == "none":
        assert torch.equal(out, x)
        return
    changed = (out - x).abs().mean().item()
    assert changed > 0.01
    ratio = ink(out) / ink(x)
    assert ratio.min() > 0.6 and ratio.max() < 1.5, "a distortion lost the digit or smeared it"
    moved = (centre(out) - centre(x)).abs().max().item()
    assert moved <= 3.5, f"the digit moved {moved:.1f} pixels: more than a 2-pixel shift and a turn"


def test_the_exported_model_reads_the_held_out_digits_as_model_json_records(splits):
    """Measured here on the committed ONNX file in ONNX Runtime. The floor is under the lecture's
    98.9% (LeNet-5 on MNIST): this model is at 98.8% on these 1,000 digits (README, "Handwritten
    digits"), and a broken export or normalisation falls far below it."""
    _, test = splits
    session = ort.InferenceSession(str(MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": digits_train.normalise(test.images).numpy()})
    accuracy = float((logits.argmax(1) == test.labels).mean())
    recorded = json.loads((MODEL / "model.json").read_text())["accuracy"]
    assert recorded["samples"] == 1000 and recorded["top1"] == round(accuracy, 4)
    assert accuracy >= 0.985
    matrix = np.array(json.loads((MODEL / "confusion.json").read_text())["matrix"])
    assert matrix.sum() == 1000 and np.trace(matrix) == (logits.argmax(1) == test.labels).sum()


def ink(x: torch.Tensor) -> torch.Tensor:
    """Each image's total ink on the 0..255 scale."""
    return (x * digits.DIGITS_STD + digits.DIGITS_MEAN).sum((1, 2, 3))


def centre(x: torch.Tensor) -> torch.Tensor:
    """Each image's centre of mass (row, column) in pixels."""
    ink = (x[:, 0] * digits.DIGITS_STD + digits.DIGITS_MEAN).clamp_min(0)
    span = torch.arange(28, dtype=torch.float32)
    total = ink.sum((1, 2))
    return torch.stack([(ink.sum(2) * span).sum(1) / total, (ink.sum(1) * span).sum(1) / total], 1)


def png_bytes_of(cell: np.ndarray) -> bytes:
    from PIL import Image

    return png_bytes(Image.fromarray(cell))
