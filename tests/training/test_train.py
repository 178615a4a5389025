import json

import torch

from training import train


def test_a_short_run_on_a_subset_lowers_the_loss_and_writes_its_files(tmp_path):
    recipe = train.Recipe("lenet5", epochs=3, batch_size=64, lr=3e-3, subset=1024)
    history = train.train(recipe, train.data.DEFAULT_DIR, tmp_path)
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.test_accuracy[-1] > 0.5
    assert {"checkpoint.pt", "metrics.json", "curves.png"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "metrics.json").read_text())["recipe"]["arch"] == "lenet5"


def test_the_same_seed_gives_the_same_weights(tmp_path):
    recipe = train.Recipe("lenet5", epochs=1, batch_size=64, subset=256, seed=3)
    train.train(recipe, train.data.DEFAULT_DIR, tmp_path / "a")
    train.train(recipe, train.data.DEFAULT_DIR, tmp_path / "b")
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["state_dict"] for run in "ab")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_augmentation_shifts_within_the_padding_and_keeps_shape():
    x = torch.full((64, 1, 28, 28), -train.FASHION_MEAN / train.FASHION_STD)
    x[:, :, 10:18, 10:18] = 1.0
    out = train.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)))
    assert not torch.equal(out, x)
