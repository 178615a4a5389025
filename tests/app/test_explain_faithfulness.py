"""Each /explain method is more faithful than a random map: deleting the pixels it ranks first
lowers the class's probability faster, or revealing them raises it faster (training/faithfulness.py,
on a few dozen Fashion-MNIST test images, fixed seed)."""

from __future__ import annotations

import pytest

from app.serving.inspect import explain
from training import faithfulness

from ..conftest import MODELS

IMAGES = 40


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, float]]:
    served = faithfulness.Served.open(MODELS / "resnet", threads=1)
    images = faithfulness.fashion_images(served.spec.input, IMAGES, seed=0)
    return faithfulness.evaluate(served, images, (*explain.METHODS, "random"), seed=0, total=IMAGES)


@pytest.mark.parametrize("method", explain.METHODS)
def test_each_method_beats_the_random_map(results, method):
    ours, chance = results[method], results["random"]
    assert ours["insertion"] - ours["deletion"] > chance["insertion"] - chance["deletion"], results
