"""LeNet-5 on OpenCV's handwritten digits: the 4,000 training digits, distorted as they are drawn.

The loop is training/train.py's; what differs is the data (training/digits.py) and the
augmentation. Digits are never flipped (a mirrored 2 is no 2); each training image is instead
moved, turned, scaled and elastically distorted (Simard, Steinkraus and Platt 2003: a random
displacement field smoothed by a Gaussian), all in one ``grid_sample`` per batch. ``--augment``
switches the parts on cumulatively (none, shift, affine, elastic) to measure what each changes.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training import digits, train
from training.data import DatasetMissing

log = logging.getLogger("training.digits_train")
LEVELS = ("none", "shift", "affine", "elastic")


@dataclass(frozen=True)
class Distortion:
    level: str = "affine"
    shift: float = 2.0  # pixels, uniform in +-shift
    degrees: float = 12.0  # rotation, uniform in +-degrees
    scale: float = 0.1  # zoom, uniform in 1 +- scale
    alpha: float = 16.0  # elastic: the field's scale in pixels (Simard's 34 cost drawn digits 2 to 4 points)
    sigma: float = 4.0  # elastic: the smoothing Gaussian's standard deviation in pixels (Simard's 4)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return distort(x, generator, self)


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) fields -> float (N, 1, 28, 28), scaled as model.json tells the service to."""
    return ((torch.from_numpy(images).float() - digits.DIGITS_MEAN) / digits.DIGITS_STD).unsqueeze(1)


def distort(x: torch.Tensor, generator: torch.Generator, how: Distortion) -> torch.Tensor:
    """One random shift, rotation, scale and elastic field per image; the field's uncovered edges
    are the paper (black), as in the served input."""
    level = LEVELS.index(how.level)
    if level == 0:
        return x
    n, size = x.shape[0], x.shape[-1]
    theta = affine(n, generator, how, level)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if level >= 3:
        grid = grid + elastic(n, size, generator, how)
    paper = -digits.DIGITS_MEAN / digits.DIGITS_STD
    return F.grid_sample(x - paper, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + paper


def affine(n: int, generator: torch.Generator, how: Distortion, level: int) -> torch.Tensor:
    """(N, 2, 3) sampling matrices: shifts alone at level 1, with rotation and scale from level 2."""
    shift_x, shift_y = symmetric(n, generator) * how.shift * 2 / 28, symmetric(n, generator) * how.shift * 2 / 28
    angle = symmetric(n, generator) * math.radians(how.degrees) if level >= 2 else torch.zeros(n)
    zoom = 1 + symmetric(n, generator) * how.scale if level >= 2 else torch.ones(n)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    return torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)


def symmetric(n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws, uniform in -1..1."""
    return torch.rand(n, generator=generator) * 2 - 1


def elastic(n: int, size: int, generator: torch.Generator, how: Distortion) -> torch.Tensor:
    """(N, size, size, 2) smoothed random displacements, in grid_sample's -1..1 units."""
    field = torch.rand(n * 2, 1, size, size, generator=generator) * 2 - 1
    radius = math.ceil(3 * how.sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / how.sigma) ** 2)
    taps = taps / taps.sum()
    field = F.conv2d(field, taps.view(1, 1, 1, -1), padding=(0, radius))
    field = F.conv2d(field, taps.view(1, 1, -1, 1), padding=(radius, 0))
    return (field.view(n, 2, size, size) * how.alpha * 2 / size).permute(0, 2, 3, 1)


def confusion(onnx_path: Path, inputs: np.ndarray, labels: np.ndarray) -> dict:
    """The exported file's confusion matrix on the held-out digits (rows: the truth, columns: the
    answer), and which digits it got wrong, by their place in the held-out set."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: inputs})
    answers = logits.argmax(1)
    matrix = np.zeros((10, 10), np.int64)
    np.add.at(matrix, (labels, answers), 1)
    wrong = np.flatnonzero(answers != labels)
    return {
        "rows": "true digit",
        "columns": "the model's answer",
        "matrix": matrix.tolist(),
        "wrong": [{"held_out_index": int(i), "digit": int(labels[i]), "answer": int(answers[i])} for i in wrong],
    }


def run(recipe: train.Recipe, how: Distortion, sheet: Path, out_dir: Path) -> train.History:
    generator = train.seed_everything(recipe.seed)
    train_split, test_split = digits.load_splits(sheet)
    x_train, y_train = normalise(train_split.images), torch.from_numpy(train_split.labels)
    x_test, y_test = normalise(test_split.images), torch.from_numpy(test_split.labels)
    log.info("augmentation: %s", how)
    history = train.fit(recipe, (x_train, y_train), (x_test, y_test), out_dir, generator=generator, augmenter=how)
    saved = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    torch.save({**saved, "augmentation": asdict(how)}, out_dir / "checkpoint.pt")  # for the export's command
    return history


def command(saved: dict) -> str:
    """The command that trains this checkpoint again, from what it recorded."""
    recipe, how = saved["recipe"], saved.get("augmentation", {})
    flags = f"--epochs {recipe['epochs']} --batch-size {recipe['batch_size']} --lr {recipe['lr']:g}"
    flags += f" --seed {recipe['seed']}"
    if how:
        flags += f" --augment {how['level']} --degrees {how['degrees']:g} --alpha {how['alpha']:g}"
    return f"python -m training.digits_train {flags}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.digits_train",
        description="Train LeNet-5 on OpenCV's digits.png (4,000 digits; 1,000 held out). Writes "
        "checkpoint.pt, metrics.json and curves.png under --out; export with "
        f"python -m training.export --arch {digits.NAME}.",
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", choices=LEVELS, default=Distortion.level, help="cumulative: each adds to the last")
    parser.add_argument("--alpha", type=float, default=Distortion.alpha, help="elastic: the field's scale in pixels")
    parser.add_argument("--degrees", type=float, default=Distortion.degrees, help="affine: the largest rotation")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible)")
    parser.add_argument("--digits", type=Path, default=digits.DEFAULT_PATH, help="OpenCV's digits.png")
    parser.add_argument("--out", type=Path, help=f"run directory (default: runs/{digits.NAME})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = train.Recipe("lenet5", args.epochs, args.batch_size, args.lr, seed=args.seed, bf16=False)
    try:
        how = Distortion(args.augment, degrees=args.degrees, alpha=args.alpha)
        run(recipe, how, args.digits, args.out or Path("runs") / digits.NAME)
    except DatasetMissing as missing:
        raise SystemExit(f"error: {missing}") from None


if __name__ == "__main__":
    main()
