"""Digits drawn with Pillow, as a person writes them on a pad or a page: the model's test beyond the
held-out digits of digits.png, which come from the same sheet as the training digits.

Each digit is a few pen strokes through points in a unit box. ``page`` renders one with a given
pen, slant, turn, position, polarity and grain; ``varied`` draws a seeded set with all of those
random. ``python -m training.digits_drawn --checkpoint runs/lenet5_digits/checkpoint.pt`` reads
such a set through training/digits.py's normalisation (the bytes the service gives the network)
and prints the accuracy: how augmentation changes what the model makes of drawn input.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Pen strokes through points "x,y" in hundredths of a box 0.7 wide and 1 high (x right, y down).
STROKE_POINTS = {
    0: ["50,5 25,20 18,50 25,82 50,95 75,82 82,50 75,18 50,5"],
    1: ["35,20 55,5 55,95"],
    2: ["20,30 30,12 50,6 70,14 75,32 62,52 20,92 82,92"],
    3: ["22,15 50,5 74,18 70,38 45,50 72,60 78,80 52,95 20,86"],
    4: ["60,5 15,62 85,62", "64,30 64,95"],
    5: ["75,7 30,7 25,45 50,38 72,50 76,74 55,93 22,87"],
    6: ["70,6 42,28 26,60 30,85 50,94 70,82 72,62 50,50 28,62"],
    7: ["18,10 82,10 42,95"],
    8: ["50,50 27,30 50,7 73,30 50,50 25,72 50,94 75,72 50,50"],
    9: ["72,32 50,50 28,34 40,10 64,10 72,32 66,94"],
}
STROKES = {
    digit: [[(int(x) / 100, int(y) / 100) for x, y in (p.split(",") for p in stroke.split())] for stroke in strokes]
    for digit, strokes in STROKE_POINTS.items()
}


@dataclass(frozen=True)
class Pen:
    page: tuple[int, int] = (280, 280)
    box: tuple[int, int, int] = (40, 40, 200)  # left, top, height; the width is 0.7 of it
    width: int = 18
    ink: int = 20
    paper: int = 255
    grain: float = 0.0  # the standard deviation of Gaussian noise over the page
    slant: float = 0.0  # x shift per unit of height, to the right going up
    turn: float = 0.0  # degrees, anticlockwise about the box's centre
    blur: float = 0.0  # a photo's softness, Gaussian radius in pixels


def page(digit: int, pen: Pen = Pen(), seed: int = 0) -> Image.Image:
    """``digit`` written with ``pen`` on a grey page."""
    left, top, size = pen.box
    image = Image.new("L", pen.page, pen.paper)
    draw = ImageDraw.Draw(image)
    cos, sin = math.cos(math.radians(pen.turn)), math.sin(math.radians(pen.turn))
    for stroke in STROKES[digit]:
        points = []
        for x, y in stroke:
            x, y = (x - 0.5) * 0.7 + pen.slant * (0.5 - y), y - 0.5
            x, y = x * cos + y * sin, -x * sin + y * cos
            points.append((left + (x + 0.35) * size, top + (y + 0.5) * size))
        draw.line(points, fill=pen.ink, width=pen.width, joint="curve")
        for x, y in (points[0], points[-1]):  # a round pen's ends
            r = pen.width / 2
            draw.ellipse((x - r, y - r, x + r, y + r), fill=pen.ink)
    if pen.blur:
        image = image.filter(ImageFilter.GaussianBlur(pen.blur))
    if pen.grain:
        noise = np.random.default_rng(seed).normal(0, pen.grain, (pen.page[1], pen.page[0]))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    return image


def varied(count_per_digit: int, seed: int = 0) -> list[tuple[int, Image.Image]]:
    """A seeded set: every digit ``count_per_digit`` times, with pen width, slant, turn, size,
    place, polarity, blur and grain drawn at random over what people send."""
    rng = np.random.default_rng(seed)
    drawn = []
    for digit in range(10):
        for _ in range(count_per_digit):
            size = int(rng.integers(60, 260))
            page_size = (int(rng.integers(size + 20, 700)), int(rng.integers(size + 20, 600)))
            dark = bool(rng.random() < 0.8)
            ink, paper = (int(rng.integers(0, 90)), int(rng.integers(170, 256)))
            pen = Pen(
                page=page_size,
                box=(
                    int(rng.integers(10, page_size[0] - 0.7 * size)),
                    int(rng.integers(10, page_size[1] - size)),
                    size,
                ),
                width=max(2, int(size * rng.uniform(0.04, 0.14))),
                ink=ink if dark else paper,
                paper=paper if dark else ink,
                grain=float(rng.uniform(0, 14)),
                slant=float(rng.uniform(-0.1, 0.35)),
                turn=float(rng.uniform(-12, 12)),
                blur=float(rng.uniform(0, 1.5)),
            )
            drawn.append((digit, page(digit, pen, seed=int(rng.integers(1 << 31)))))
    return drawn


def accuracy(checkpoints: list[Path], count_per_digit: int, seed: int) -> dict[Path, float]:
    """Each checkpoint's top-1 on one ``varied`` set, through training/digits.py's normalisation."""
    import torch

    from training import digits, digits_train, nets

    drawn = varied(count_per_digit, seed)
    fields = digits_train.normalise(np.stack([digits.to_field(np.asarray(image)) for _, image in drawn]))
    truth = np.array([d for d, _ in drawn])
    scores = {}
    for checkpoint in checkpoints:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model = nets.create(saved["arch"])
        model.load_state_dict(saved["state_dict"])
        with torch.no_grad():
            scores[checkpoint] = float((model.eval()(fields).argmax(1).numpy() == truth).mean())
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.digits_drawn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, action="append", required=True, help="repeat to compare runs")
    parser.add_argument("--per-digit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for checkpoint, score in accuracy(args.checkpoint, args.per_digit, args.seed).items():
        print(f"{checkpoint}: top-1 {score:.4f} on {10 * args.per_digit} drawn digits")


if __name__ == "__main__":
    main()
