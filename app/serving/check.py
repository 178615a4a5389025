"""``cnnserve check``: a model folder loaded exactly as the service will load it, then asked about
real photos, with the answers held to the source framework's when that is installed.

Served answers that differ from the framework's are refused with the preprocessing step that
differs: each step's usual alternatives (crop or not, 0..1 or 0..255 pixels, RGB or BGR, the common
normalisations, the resampling filter) are tried in turn on the served session, and the one that
makes the answers agree is named. Nothing here imports torch: the framework's side comes in as
a function from an image file to its logits (training/importer.py makes one).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from app.config import Settings
from app.metrics import Metrics
from app.serving import loader, postprocess, preprocess
from app.serving.errors import ServingError
from app.serving.inspect import explain
from app.serving.loader import Model
from app.serving.presets import PRESETS, TOLERANCE
from app.serving.spec import InputSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "static" / "examples"
TIMED_RUNS = 5
COMMON_SIZES = (128, 160, 192, 224, 256, 288, 299, 320, 384)  # tried when the graph's spatial dimensions are dynamic
CROP_RATIOS = (0.875, 0.9, 0.95, 1.0)  # the centre crop's share of the shorter side in common recipes
Reference = Callable[[Path], np.ndarray]
"""The framework's own preprocessing and model: an image file -> its logits, one per class."""


class CheckFailed(ServingError):
    """The model loads, but its served answers are not the framework's."""

    status = 422


@dataclass(frozen=True)
class Photo:
    name: str
    top5: list[tuple[int, str, float]]
    milliseconds: float
    max_diff: float | None = None  # against the framework's logits, as a fraction of their spread


@dataclass
class Report:
    model: str
    version: str
    provider: str
    photos: list[Photo] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    methods: dict[str, str | None] = field(default_factory=dict)  # method -> its default layer (None: occlusion)
    compared_with: str | None = None
    tolerance: float = TOLERANCE

    def lines(self) -> list[str]:
        """The report as a person reads it."""
        out = [f"{self.model} version {self.version} loads on {self.provider}, as the service will load it"]
        for photo in self.photos:
            best = ", ".join(f"{label} {score:.1%}" for _, label, score in photo.top5[:3])
            agreed = (
                ""
                if photo.max_diff is None
                else f"; top-5 as in {self.compared_with}, logits within {photo.max_diff:.2%}"
            )
            out.append(f"  {photo.name}: {best} ({photo.milliseconds:.1f} ms){agreed}")
        if self.compared_with:
            out.append(
                f"answers equal to those of {self.compared_with} (tolerance {self.tolerance:.0%} of the logits' spread)"
            )
        more = " ..." if len(self.layers) > 8 else ""
        out.append(f"/featuremaps offers {len(self.layers)} layers: {', '.join(self.layers[:8])}{more}")
        methods = [f"{m} ({layer})" if layer else m for m, layer in self.methods.items()]
        out.append(f"/explain methods that fit: {', '.join(methods) or 'none'}")
        return out


def sample_photos(extra: list[Path] | None = None) -> list[Path]:
    """The repository's sample photos, scikit-image's where it is installed, and ``extra``."""
    found = sorted(EXAMPLES.glob("*.jpg"))
    try:
        import skimage.data

        folder = Path(skimage.data.__file__).parent
        names = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")
        found += [folder / n for n in names if (folder / n).is_file() and n not in {p.name for p in found}]
    except ImportError:
        pass
    return found + list(extra or [])


def load(folder: Path, name: str, version: str, settings: Settings) -> Model:
    """The model as the service loads it (the same loader: hash, signature, test inferences),
    with one worker: the check asks one photo at a time."""
    own = settings.model_copy(update={"inference_workers": 1, "featuremaps": True})
    try:
        return loader.load(folder, own, Metrics(), 1, name=name, version=version)
    except loader.ModelRefused as refused:
        raise CheckFailed(f"{name} version {version} would be refused by the service: {refused}") from None


def check(
    folder: Path,
    name: str,
    version: str,
    settings: Settings,
    images: list[Path],
    reference: Reference | None = None,
    framework: str | None = None,
    tolerance: float = TOLERANCE,
) -> Report:
    model = load(folder, name, version, settings)
    report = Report(
        name, version, model.providers[0], compared_with=framework if reference else None, tolerance=tolerance
    )
    for path in images:
        logits, milliseconds = timed(model, model.spec.input, path.read_bytes(), settings.max_pixels)
        diff = None
        if reference is not None:
            expected = np.asarray(reference(path), dtype=np.float64).reshape(-1)
            diff = disagreement(expected, logits, tolerance)
            if diff is None or diff > tolerance:
                raise CheckFailed(
                    diagnose(model, path, expected, logits, framework or "the framework", tolerance, settings)
                )
        report.photos.append(Photo(path.name, top(model, logits), milliseconds, diff))
    report.layers, report.methods = offered(model, settings)
    return report


def run(model: Model, spec: InputSpec, data: bytes, max_pixels: int) -> np.ndarray:
    batch = preprocess.prepare(data, spec, max_pixels)
    (logits,) = model.session.run([model.spec.output.name], {spec.name: batch})
    return np.asarray(logits[0], dtype=np.float64)


def timed(model: Model, spec: InputSpec, data: bytes, max_pixels: int) -> tuple[np.ndarray, float]:
    """The served logits and the median milliseconds of preprocessing plus inference."""
    seconds = []
    for _ in range(TIMED_RUNS):
        started = time.perf_counter()
        logits = run(model, spec, data, max_pixels)
        seconds.append(time.perf_counter() - started)
    return logits, 1000 * statistics.median(seconds)


def top(model: Model, logits: np.ndarray, k: int = 5) -> list[tuple[int, str, float]]:
    scores = postprocess.probabilities(logits.astype(np.float32), model.spec.output.kind)
    best = np.argsort(-logits)[:k]
    return [(int(i), model.spec.labels[i], float(scores[i])) for i in best]


def disagreement(expected: np.ndarray, served: np.ndarray, tolerance: float) -> float | None:
    """The largest logit difference as a fraction of the expected logits' spread, or None when
    the top-5 differ by more than ties: the classes may swap places only where the framework's
    own logits are within the tolerance of each other."""
    if expected.shape != served.shape:
        return None
    spread = max(float(expected.max() - expected.min()), 1e-12)
    k = min(5, len(expected))
    ours, theirs = np.argsort(-served)[:k], np.argsort(-expected)[:k]
    if np.any(np.abs(expected[ours] - expected[theirs]) > tolerance * spread):
        return None
    return float(np.abs(expected - served).max() / spread)


def alternatives(spec: InputSpec, dynamic: bool = False) -> list[tuple[str, str, dict[str, Any]]]:
    """(step, what it would be, the InputSpec fields that say so) for each usual alternative; the
    common input sizes too when the graph takes any (``dynamic``)."""
    found: list[tuple[str, str, dict[str, Any]]] = []
    side = min(spec.height, spec.width)
    for size in COMMON_SIZES if dynamic else ():
        if size != side:
            resize = math.floor(size * spec.resize / side) if spec.resize else None
            found.append(("size", f"a {size}x{size} input", {"height": size, "width": size, "resize": resize}))
    for ratio in CROP_RATIOS:
        shorter = math.floor(side / ratio)
        if shorter != spec.resize:
            found.append(("crop", f"the shorter side resized to {shorter}, then the centre crop", {"resize": shorter}))
    if spec.resize is not None:
        found.append(("crop", "a plain resize to the input size, no crop", {"resize": None}))
    if spec.color != "L":
        other = "BGR" if spec.color == "RGB" else "RGB"
        found.append(("channel order", other, {"color": other}))
        reordered = {"color": other, "mean": spec.mean[::-1], "std": spec.std[::-1]}
        found.append(("channel order", f"{other}, mean and std reordered", reordered))
    found.append(
        (
            "scale",
            "0..1 pixels (std times 255)",
            {"mean": [m * 255 for m in spec.mean], "std": [s * 255 for s in spec.std]},
        )
    )
    found.append(
        (
            "scale",
            "0..255 pixels (std divided by 255)",
            {"mean": [m / 255 for m in spec.mean], "std": [s / 255 for s in spec.std]},
        )
    )
    for preset, fields in PRESETS.items():
        if len(fields["mean"]) == spec.channels and (fields["mean"], fields["std"]) != (spec.mean, spec.std):
            found.append(
                ("normalisation", f"the {preset} mean and std", {"mean": fields["mean"], "std": fields["std"]})
            )
    for interpolation in ("bilinear", "bicubic", "nearest"):
        if interpolation != spec.interpolation:
            found.append(("resampling", f"{interpolation} resampling", {"interpolation": interpolation}))
    return found


def diagnose(
    model: Model,
    path: Path,
    expected: np.ndarray,
    served: np.ndarray,
    framework: str,
    tolerance: float,
    settings: Settings,
) -> str:
    """Why the served answer differs from the framework's on ``path``: the one alternative step
    that makes them agree, or that none does."""
    spec = model.spec.input
    if expected.shape != served.shape:
        return f"{framework} gives {expected.shape[0]} scores, the served model {served.shape[0]}"
    spread = max(float(expected.max() - expected.min()), 1e-12)
    found = (
        f"on {path.name} the served answers differ from those of {framework}: logits off by up to "
        f"{np.abs(expected - served).max() / spread:.1%} of their spread (allowed {tolerance:.0%}), "
        f"top-5 {np.argsort(-served)[:5].tolist()} against {np.argsort(-expected)[:5].tolist()}"
    )
    data = path.read_bytes()
    agreeing = []
    dynamic = -1 in (model.input.shape[1:3] if spec.layout == "NHWC" else model.input.shape[2:4])
    for step, what, fields in alternatives(spec, dynamic):
        try:
            other = InputSpec.model_validate({**spec.model_dump(), **fields})
        except ValueError:
            continue
        diff = disagreement(expected, run(model, other, data, settings.max_pixels), tolerance)
        if diff is not None and diff <= tolerance:
            agreeing.append((diff, step, what, fields))
    if not agreeing:
        steps = "size, crop, scale, channel order, normalisation, resampling"
        return f"{found}. No single preprocessing step ({steps}) explains it"
    _, step, what, fields = min(agreeing, key=lambda found: found[0])
    change = ", ".join(f"{key} {value}" for key, value in fields.items())
    return f"{found}. The {step} differs: with {what} they agree (model.json's input: {change})"


def offered(model: Model, settings: Settings) -> tuple[list[str], dict[str, str | None]]:
    """The layers /featuremaps offers and, per /explain method that fits, the layer it uses when
    none is named (within CNNSERVE_MAX_EXPLAIN_PASSES)."""
    if model.analysis is None or model.featuremaps is None:
        return [], {}
    session = model.featuremaps.get()
    proto = onnx.load(str(model.path / "model.onnx"))
    explainer = explain.Explainer(proto, model.spec, settings.providers, model.plan.threads)
    limit = settings.max_explain_passes
    methods: dict[str, str | None] = {}
    for method in explain.LAYER_METHODS:
        layer = explain.default_layer_for(method, model.analysis, session, explainer, limit)
        if layer is None:
            continue
        shape = session.shapes[layer.tensor]
        cost = explain.passes(method, shape, explain.Occlusion.default(model.spec.input), model.spec.input)
        if method in explainer.methods(layer.tensor, shape) and cost <= limit:
            methods[method] = layer.name
    if explain.Occlusion.default(model.spec.input).passes(model.spec.input) <= limit:
        methods["occlusion"] = None
    return [layer.name for layer in model.analysis.layers], methods
