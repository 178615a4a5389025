"""Are the maps faithful to the model? Deletion and insertion curves (Petsiuk et al., 2018, RISE)
for every /explain method, against a random map and a centre-bias map.

Deletion: the pixels a map ranks highest are replaced first by the dataset's mean (zero after
normalisation), a tenth of the image at a time, and the explained class's probability is read after
each step; a faithful map makes it fall fast (a low area under the curve). Insertion: from the
all-mean image the pixels are revealed in the same order; a faithful map makes the probability
rise fast (a high area). The class is the model's top-1 on the unaltered image. Ties in a map
(ReLU leaves many zeros) are broken at random, so that no map gains from the raster order. The
random map is random at 7x7 (the CAMs' own resolution), upsampled as they are: random single
pixels, deleted, would scatter noise over the image and destroy any prediction faster than a
deletion in blobs, a baseline no map could beat for reasons unrelated to where the evidence is.

It runs on the served ONNX files with the service's own method code (app/serving/inspect/
explain.py) and ONNX Runtime; no torch:

    python -m training.faithfulness                      # GoogLeNet and ResNet on 1,000 test images,
                                                         # EfficientNet-Lite0 on the sample photos
    python -m training.faithfulness --models resnet --images 100
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from app.serving import preprocess
from app.serving.inspect import explain, explain_run
from app.serving.inspect.featuremaps import Analysis, FeatureMapSession
from app.serving.runtime import create_session
from app.serving.spec import InputSpec, ModelSpec
from training.data import load_split
from training.photos import sample_photos

ROOT = Path(__file__).resolve().parent.parent
STEPS = 10
RANDOM_GRID = 7  # the random map's cells: the resolution of the layer the CAMs are drawn from
BASELINES = ("random", "centre")
METHODS = (*explain.METHODS, *BASELINES)
FASHION_MODELS = ("googlenet", "resnet")


@dataclass
class Served:
    """A model folder opened as the service opens it, with a forward pass in batches."""

    spec: ModelSpec
    explainer: explain.Explainer
    session: FeatureMapSession
    layer: str
    plain: ort.InferenceSession
    batch: int = 256

    @classmethod
    def open(cls, folder: Path, threads: int = 0) -> Served:
        spec = ModelSpec.model_validate_json((folder / "model.json").read_text())
        return cls.from_proto(onnx.load(str(folder / "model.onnx")), spec, threads)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, spec: ModelSpec, threads: int = 0) -> Served:
        """``proto`` served as the service would; ``threads`` 0 lets ONNX Runtime choose."""
        session = FeatureMapSession(proto, spec, Analysis.of(proto, spec), "cpu", threads)
        layer = explain.default_layer(session.analysis, session)
        assert layer is not None, f"{spec.name} has no layer to explain"
        plain = create_session(proto.SerializeToString(), "cpu", threads)
        return cls(spec, explain.Explainer(proto, spec, "cpu", threads), session, layer.tensor, plain)

    def forward(self, images: np.ndarray) -> np.ndarray:
        rows = []
        for start in range(0, len(images), self.batch):
            chunk = np.ascontiguousarray(images[start : start + self.batch], dtype=np.float32)
            rows.append(self.plain.run([self.spec.output.name], {self.spec.input.name: chunk})[0])
        return np.concatenate(rows)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        scores = self.forward(images).astype(np.float64)
        if self.spec.output.kind == "logits":
            scores = np.exp(scores - scores.max(1, keepdims=True))
            scores /= scores.sum(1, keepdims=True)
        return scores

    def heat(self, method: str, x: np.ndarray, class_index: int, rng: np.random.Generator) -> np.ndarray:
        """``method``'s map over the input (H, W) in [0, 1], as /explain computes it."""
        spec = self.spec.input
        if method == "random":
            return explain.upsample(rng.random((RANDOM_GRID, RANDOM_GRID)), spec, scale=True)
        if method == "centre":
            return centre_bias(spec)
        values = self.explainer.values(x)
        kind, tensor = self.spec.output.kind, self.layer
        chunk = self.batch
        if method == "gradcam":
            found = explain.gradcam(self.explainer, values, tensor, class_index)
        elif method == "eigencam":
            found = explain.eigencam(values[tensor][0])
        else:
            if method == "scorecam":
                steps = explain.scorecam(x, values[tensor][0], class_index, spec, kind, chunk)
            elif method == "ablationcam":
                tail = self.explainer.tail(tensor)
                full = float(values[self.explainer.output][0, class_index])
                steps = explain.ablationcam(values, tensor, tail.inputs, full, class_index, chunk)
            else:
                base = float(self.probabilities(x)[0, class_index])
                steps = explain.occlusion(x, class_index, spec, kind, explain.Occlusion.default(spec), base, chunk)
            found = explain_run.run(steps, self.forward, self.explainer)
        return explain.upsample(found, spec, scale=True)


def centre_bias(spec: InputSpec) -> np.ndarray:
    """A Gaussian centred on the image (sigma a quarter of each side): objects sit in the middle."""
    rows = (np.arange(spec.height) - (spec.height - 1) / 2) / (spec.height / 4)
    cols = (np.arange(spec.width) - (spec.width - 1) / 2) / (spec.width / 4)
    return np.exp(-0.5 * (rows[:, None] ** 2 + cols[None, :] ** 2))


def order(heat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel indices, most important first; ties broken at random."""
    return np.lexsort((rng.random(heat.size), -heat.ravel()))


def curves(
    served: Served, x: np.ndarray, heat: np.ndarray, class_index: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The class's probability after each of STEPS + 1 deletion and insertion steps."""
    spec = served.spec.input
    ranked = order(heat, rng)
    counts = np.linspace(0, heat.size, STEPS + 1).round().astype(int)
    keep = np.ones((STEPS + 1, heat.size), np.float32)
    for step, count in enumerate(counts):
        keep[step, ranked[:count]] = 0
    keep = keep.reshape(STEPS + 1, spec.height, spec.width)
    masks = keep[:, None] if spec.layout == "NCHW" else keep[..., None]
    deleted = x * masks
    inserted = x * (1 - masks)
    scores = served.probabilities(np.concatenate([deleted, inserted]))[:, class_index]
    return scores[: STEPS + 1], scores[STEPS + 1 :]


def area(curve: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced fractions from 0 to 1 (trapezoids)."""
    return float(((curve[1:] + curve[:-1]) / 2).mean())


def evaluate(
    served: Served, images: Iterator[np.ndarray], methods: tuple[str, ...], seed: int = 0, total: int | None = None
) -> dict[str, dict[str, float]]:
    """Mean deletion and insertion AUC per method over ``images`` (each a batch of one)."""
    rng = np.random.default_rng(seed)
    sums = {m: np.zeros(2) for m in methods}
    count = 0
    for x in tqdm(images, total=total, desc=served.spec.name, unit="image"):
        class_index = int(served.forward(x)[0].argmax())
        for method in methods:
            deletion, insertion = curves(served, x, served.heat(method, x, class_index, rng), class_index, rng)
            sums[method] += (area(deletion), area(insertion))
        count += 1
    return {m: {"deletion": float(s[0] / count), "insertion": float(s[1] / count)} for m, s in sums.items()}


def fashion_images(spec: InputSpec, count: int, seed: int = 0) -> Iterator[np.ndarray]:
    """``count`` test images drawn at random (fixed seed), as the model is given them."""
    split = load_split("test")
    chosen = np.random.default_rng(seed).choice(len(split.images), count, replace=False)
    for index in chosen:
        pixels = split.images[index].astype(np.float32)
        yield ((pixels - spec.mean[0]) / spec.std[0])[None, None]


def photo_images(spec: InputSpec) -> Iterator[np.ndarray]:
    for path in sample_photos().values():
        opened = preprocess.open_checked(path.read_bytes(), 10**9)
        yield preprocess.to_tensor(preprocess.finish(opened, spec), spec)


def table(results: dict[str, dict[str, dict[str, float]]], counts: dict[str, str]) -> str:
    """The README's table: per model and method, deletion (lower is better) and insertion (higher)."""
    lines = [
        "| model (images) | method | deletion AUC (lower is better) | insertion AUC (higher is better) |",
        "| --- | --- | --- | --- |",
    ]
    for model, rows in results.items():
        for method, row in rows.items():
            lines.append(f"| `{model}` ({counts[model]}) | {method} | {row['deletion']:.3f} | {row['insertion']:.3f} |")
    return "\n".join(lines)


def run_model(name: str, args: argparse.Namespace) -> dict:
    """One model's results, written to OUT/NAME.json as soon as they are known."""
    served = Served.open(args.models_dir / name)
    if served.spec.input.height == 28:
        images, total = fashion_images(served.spec.input, args.images, args.seed), args.images
        described = f"{args.images} Fashion-MNIST"
    else:
        total = len(sample_photos())
        images, described = photo_images(served.spec.input), f"{total} photos"
    found = {
        "images": described,
        "steps": STEPS,
        "seed": args.seed,
        "results": evaluate(served, images, METHODS, args.seed, total),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(found, indent=2))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[*FASHION_MODELS, "efficientnet_lite0"])
    parser.add_argument("--images", type=int, default=1000, help="Fashion-MNIST test images per network")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "faithfulness", help="one JSON per model here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="only print the table of the JSONs already in --out")
    args = parser.parse_args(argv)
    found = {}
    for name in args.models:
        path = args.out / f"{name}.json"
        if args.table:
            if path.exists():
                found[name] = json.loads(path.read_text())
        else:
            found[name] = run_model(name, args)
    print(table({n: f["results"] for n, f in found.items()}, {n: f["images"] for n, f in found.items()}))


if __name__ == "__main__":
    main()
