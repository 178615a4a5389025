"""Train one of the lecture's networks on Fashion-MNIST (or any MNIST-format directory).

The recipe, top to bottom: data, model, AdamW with a one-cycle schedule and label smoothing,
random shifts and horizontal flips, bf16 autocast and channels-last on CPUs that have them,
per-epoch test accuracy, then a checkpoint, a metrics file and a training-curve PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import data, nets

log = logging.getLogger("training.train")

# Fashion-MNIST's training-set statistics, on the 0..255 pixel scale model.json uses.
FASHION_MEAN = 72.94
FASHION_STD = 90.02


@dataclass
class Recipe:
    arch: str
    epochs: int
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0
    subset: int | None = None
    bf16: bool = True


@dataclass
class History:
    epochs: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), scaled as model.json tells the service to."""
    return ((torch.from_numpy(images).float() - FASHION_MEAN) / FASHION_STD).unsqueeze(1)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image random shifts of up to 2 pixels (zero-padded, like the paper's 32x32 framing)
    and horizontal flips (clothes are left-right symmetric; digits would not be)."""
    n, size = x.shape[0], x.shape[-1]
    padded = F.pad(x[:, 0], (2, 2, 2, 2), value=float(-FASHION_MEAN / FASHION_STD))
    dy, dx = torch.randint(0, 5, (2, n, 1), generator=generator)
    span = torch.arange(size)
    rows, cols = (dy + span)[:, :, None], (dx + span)[:, None, :]
    shifted = padded[torch.arange(n)[:, None, None], rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], shifted.flip(3), shifted)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """Mean loss and top-1 accuracy in fp32, the precision the exported model runs in."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), 1000):
        xb, yb = x[start : start + 1000].to(device), y[start : start + 1000].to(device)
        logits = model(xb.contiguous(memory_format=torch.channels_last))
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return loss / len(x), correct / len(x)


def train(recipe: Recipe, data_dir: Path, out_dir: Path) -> History:
    generator = seed_everything(recipe.seed)
    train_split, test_split = data.load_split("train", data_dir), data.load_split("test", data_dir)
    if recipe.subset:
        train_split = data.Split(train_split.images[: recipe.subset], train_split.labels[: recipe.subset])
    x_train, y_train = normalise(train_split.images), torch.from_numpy(train_split.labels)
    x_test, y_test = normalise(test_split.images), torch.from_numpy(test_split.labels)
    return fit(recipe, (x_train, y_train), (x_test, y_test), out_dir, generator=generator)


def fit(
    recipe: Recipe,
    train_set: tuple[torch.Tensor, torch.Tensor],
    test_set: tuple[torch.Tensor, torch.Tensor],
    out_dir: Path,
    *,
    generator: torch.Generator,
    augmenter: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = augment,
) -> History:
    """The loop on tensors already normalised, so another dataset and its own augmentation can use it."""
    device = pick_device()
    (x_train, y_train), (x_test, y_test) = train_set, test_set
    model = nets.create(recipe.arch).to(device, memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * ((len(x_train) + recipe.batch_size - 1) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe.lr, total_steps=steps)
    log.info("training %s (%d parameters) on %s, %d images", recipe.arch, count_parameters(model), device, len(x_train))

    history = History()
    for epoch in range(1, recipe.epochs + 1):
        started = time.perf_counter()
        train_loss = train_epoch(
            model, optimiser, schedule, x_train, y_train, recipe, device, generator, epoch, augmenter
        )
        test_loss, accuracy = evaluate(model, x_test, y_test, device)
        history.epochs.append(epoch)
        history.train_loss.append(train_loss)
        history.test_loss.append(test_loss)
        history.test_accuracy.append(accuracy)
        history.seconds.append(time.perf_counter() - started)
        log.info(
            "epoch %d/%d  train loss %.4f  test loss %.4f  test accuracy %.4f",
            epoch,
            recipe.epochs,
            train_loss,
            test_loss,
            accuracy,
        )

    save_run(model, recipe, history, out_dir)
    return history


def train_epoch(model, optimiser, schedule, x, y, recipe: Recipe, device, generator, epoch: int, augmenter) -> float:
    model.train()
    order = torch.randperm(len(x), generator=generator)
    total, seen = 0.0, 0
    bar = tqdm(range(0, len(x), recipe.batch_size), desc=f"epoch {epoch}/{recipe.epochs}", unit="batch", leave=False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16)
    for start in bar:
        index = order[start : start + recipe.batch_size]
        xb = augmenter(x[index], generator).to(device).contiguous(memory_format=torch.channels_last)
        yb = y[index].to(device)
        with autocast:
            loss = F.cross_entropy(model(xb), yb, label_smoothing=recipe.label_smoothing)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        total += loss.item() * len(index)
        seen += len(index)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / seen


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_run(model: torch.nn.Module, recipe: Recipe, history: History, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"arch": recipe.arch, "state_dict": model.state_dict(), "recipe": asdict(recipe)}, out_dir / "checkpoint.pt"
    )
    metrics = {"recipe": asdict(recipe), "history": asdict(history), "parameters": count_parameters(model)}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(history, recipe.arch, out_dir / "curves.png")
    log.info("wrote %s", out_dir)


def plot_curves(history: History, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(history.epochs, history.train_loss, label="train (augmented, smoothed)")
    left.plot(history.epochs, history.test_loss, label="test")
    left.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    left.legend()
    right.plot(history.epochs, history.test_accuracy, marker="o")
    right.set(xlabel="epoch", ylabel="top-1 accuracy", title=f"{title}: test accuracy")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a lecture CNN on Fashion-MNIST. Writes checkpoint.pt, metrics.json and "
        "curves.png under --out; export the checkpoint with python -m training.export.",
    )
    parser.add_argument("--arch", required=True, choices=sorted(set(nets.ARCHITECTURES) - {"kernels"}))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", type=int, help="train on the first N training images only (smoke runs)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 throughout")
    parser.add_argument("--data-dir", type=Path, default=data.DEFAULT_DIR, help="MNIST-format directory")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/ARCH)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    recipe = Recipe(
        args.arch, args.epochs, args.batch_size, args.lr, seed=args.seed, subset=args.subset, bf16=args.bf16
    )
    try:
        train(recipe, args.data_dir, args.out or Path("runs") / args.arch)
    except data.DatasetMissing as missing:
        raise SystemExit(f"error: {missing}") from None


if __name__ == "__main__":
    main()
