"""The GPU check and benchmark, one call, for a machine with an NVIDIA GPU and onnxruntime-gpu.

Checks first, as before: every model loads on the CUDA execution provider (any model elsewhere, or
refused, stops the script with an error, as CNNSERVE_PROVIDERS=cuda stops the service: no silent
fall-back to the CPU); the served top-5 on the sample photos equals the PyTorch reference; the CUDA
logits equal the CPU's within 1e-3, with the same top-5.

Then over real HTTP (bench/gpu_serving.py, bench/http_load.py), both candidates for a GPU, each a
``python -m app serve``: ``shared`` (a server process per core decoding, one inference process per
GPU fed through shared memory) and ``per-process`` (a CUDA session in each server process), at 1,
8, 32 and 128 connections on a small JPEG, a 12-megapixel JPEG and V2 binary tensors; each
candidate's answer checked against the CPU's and its provider against the demanded one; beside
them the GPU limit (bare ONNX Runtime at the largest batch shape, and at batch 1) and the host's
decode ceiling. It prints ratios to both, which candidate served more, and issue 23's goals, met
or missed; it exits non-zero if a check fails, after printing (and writing) every figure. At
``--seconds 5``, about 5 minutes.

``--providers cpu`` runs all of it on the CPU (the comparison with the CPU is then trivially
equal): the test suite runs it so, briefly, where there is no GPU.

    python -m bench.gpu --seconds 5 --out bench/results/gpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from app.config import Settings
from app.serving import services as wiring
from app.serving.loader import read_spec
from app.serving.preprocess import prepare
from app.serving.runtime import CPU, CUDA, choose_providers
from app.serving.services import Services
from bench import gpu_serving as serving
from training.photos import sample_photos

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MODEL = "efficientnet_lite0"
TOLERANCE = 2e-4  # the CPU suite's: ONNX Runtime against PyTorch, and the box resize against torchvision's
LOGIT_TOLERANCE = 1e-3  # CUDA against the CPU, on the same tensors
DEMANDED = {"cuda": CUDA, "cpu": CPU}  # --providers auto demands nothing
SHAPES_TRIED = (8, 16, 32, 64)  # bare batch sizes measured beside the largest served shape


def loaded(settings: Settings) -> Services:
    """One server process's services (app/sizing.py gives CUDA one process; this is it)."""
    services = wiring.build(settings, processes=1)
    services.repository.load_all()
    return services


def check_models(services: Services) -> list[dict[str, Any]]:
    rows = []
    for model in services.repository.models.values():
        rows.append({"model": model.name, "provider": model.providers[0], "plan": model.plan.describe()})
        print(f"{model.name:20} {model.providers[0]:26} {model.plan.describe()}")
    for refusal in services.repository.refused.values():
        print(f"{refusal.name:20} REFUSED: {refusal.reason}")
    return rows


def require_providers(services: Services, preference: str) -> None:
    """Stops the script, as CNNSERVE_PROVIDERS=cuda stops the service, when a model is refused or
    runs on another provider than the one demanded: ONNX Runtime falls back to the CPU with only a
    warning (onnxruntime #21825), and every figure after that would be the CPU's."""
    demanded = DEMANDED.get(preference)
    if demanded is None:
        return
    repository = services.repository
    wrong = [f"{m.name} runs on {m.providers[0]}" for m in repository.models.values() if m.providers[0] != demanded]
    wrong += [f"{r.name} was refused: {r.reason}" for r in repository.refused.values()]
    if MODEL not in repository.models and MODEL not in repository.refused:
        wrong.append(f"{MODEL} is not in {MODELS}")
    if wrong:
        raise SystemExit(
            f"error: --providers {preference} demands {demanded} for every model, but\n  " + "\n  ".join(wrong)
        )


async def check_reference(services: Services) -> dict[str, Any]:
    reference = json.loads((MODELS / MODEL / "reference.json").read_text())["photos"]
    photos, worst, same = sample_photos(), 0.0, True
    for name, expected in reference.items():
        served = (await services.service.classify(MODEL, photos[name].read_bytes(), 5)).predictions
        same &= [p.index for p in served] == [p["index"] for p in expected]
        worst = max(worst, *(abs(p.score - e["score"]) for p, e in zip(served, expected, strict=True)))
    print(
        f"top-5 equal to the PyTorch reference on {len(reference)} photos: {same}; largest score gap {worst:.2g} "
        f"(the CPU suite allows {TOLERANCE:g})"
    )
    return {"photos": len(reference), "top5_equal": same, "max_score_gap": worst}


async def logits(services: Services, tensor: np.ndarray) -> np.ndarray:
    """The model's raw output for one preprocessed image, through the service's tensor path (the
    batcher, padded on CUDA as a served image is)."""
    name = services.repository.get(MODEL).input.name
    inference = await services.service.infer(MODEL, {name: tensor})
    values: np.ndarray = inference.values[0]
    return values


def top5(values: np.ndarray) -> list[int]:
    return [int(i) for i in np.argsort(-values, kind="stable")[:5]]


async def compare_with_cpu(services: Services) -> dict[str, Any]:
    """The same tensors through this provider and through a second set of services on the CPU:
    the top-5 must be equal and every logit within LOGIT_TOLERANCE."""
    cpu = loaded(services.settings.model_copy(update={"providers": "cpu"}))
    spec, provider = services.repository.get(MODEL).spec.input, services.repository.get(MODEL).providers[0]
    photos: dict[str, Any] = {}
    try:
        for photo, path in sample_photos().items():
            tensor = prepare(path.read_bytes(), spec, services.settings.max_pixels)
            ours, theirs = await logits(services, tensor), await logits(cpu, tensor)
            diff = float(np.abs(ours - theirs).max())
            photos[photo] = {"top5": top5(ours), "cpu_top5": top5(theirs), "max_logit_diff": diff}
    finally:
        await cpu.repository.close()
    same = all(p["top5"] == p["cpu_top5"] for p in photos.values())
    worst = max(p["max_logit_diff"] for p in photos.values())
    print(
        f"{provider} against {CPU} on {len(photos)} photos: top-5 equal: {same}; largest logit difference "
        f"{worst:.2g} (allowed {LOGIT_TOLERANCE:g})"
    )
    return {"photos": photos, "top5_equal": same, "max_logit_diff": worst, "tolerance": LOGIT_TOLERANCE}


def bare_providers(preference: str, search: str = "") -> list[Any]:
    """The providers the service would ask for (app/serving/runtime.py), with another cuDNN
    convolution search if ``search`` names one."""
    chosen = choose_providers(preference, ort.get_available_providers())
    if not search:
        return chosen
    return [(p[0], {**p[1], "cudnn_conv_algo_search": search}) if isinstance(p, tuple) else p for p in chosen]


def bare_rate(tensor: np.ndarray, batches: tuple[int, ...], seconds: float, providers: list[Any]) -> float:
    """Images/s of the model alone, running batches of the given sizes in turn: the limit at one
    size, or (on CUDA) what changing shapes, as a dynamic batcher makes, cost ONNX Runtime and
    cuDNN, with the service's convolution algorithm search or another one."""
    session = ort.InferenceSession(str(MODELS / MODEL / "model.onnx"), providers=providers)
    name = session.get_inputs()[0].name
    feeds = [{name: np.repeat(tensor, batch, axis=0)} for batch in batches]
    for _ in range(3):
        for feed in feeds:
            session.run(None, feed)
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for feed, batch in zip(feeds, batches, strict=True):
            session.run(None, feed)
            images += batch
    return images / (time.perf_counter() - started)


def small_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.open(sample_photos()["chelsea"]).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def failures(figures: dict[str, Any]) -> list[str]:
    """What the checks found wrong; the figures are written either way."""
    found = []
    if not figures["reference"]["top5_equal"]:
        found.append("the served top-5 differs from the PyTorch reference")
    cpu = figures["against_cpu"]
    if not cpu["top5_equal"]:
        found.append("the top-5 differs from the CPU's")
    if cpu["max_logit_diff"] > LOGIT_TOLERANCE:
        found.append(f"a logit differs from the CPU's by {cpu['max_logit_diff']:.2g} (allowed {LOGIT_TOLERANCE:g})")
    for candidate, row in figures["candidates"].items():
        if row["provider"] != figures["provider"]:
            found.append(f"{candidate} served on {row['provider']}, not {figures['provider']}")
        if not row["same_top5"] or row["max_score_gap"] > serving.SCORE_TOLERANCE:
            found.append(
                f"{candidate}'s answer over HTTP differs from the CPU's (score gap {row['max_score_gap']:.2g})"
            )
    return found


async def checks(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Today's checks, in this process: every model on the demanded provider, the top-5 against
    PyTorch's, the logits against a CPU service's; and the CPU service's answer to the small JPEG,
    which both candidates must give over HTTP."""
    services = loaded(settings)
    figures: dict[str, Any] = {"device": ort.get_device(), "onnxruntime": ort.__version__}
    try:
        figures["models"] = check_models(services)
        require_providers(services, args.providers)
        figures["provider"] = services.repository.get(MODEL).providers[0]
        figures["reference"] = await check_reference(services)
        figures["against_cpu"] = await compare_with_cpu(services)
    finally:
        await services.repository.close()
    cpu = loaded(settings.model_copy(update={"providers": "cpu"}))
    try:
        figures["cpu_answer"] = (await cpu.service.classify(MODEL, small_jpeg(), 5)).predictions
    finally:
        await cpu.repository.close()
    return figures


def limits(tensor: np.ndarray, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The GPU limit: bare ONNX Runtime at the largest batch shape; and at 1 and at the sizes around
    it (SHAPES_TRIED), from which the largest shape is to be chosen."""
    largest = settings.batch_shape_list[-1]
    providers = bare_providers(args.providers)
    sizes = sorted({1, largest, *SHAPES_TRIED})
    rates = {size: bare_rate(tensor, (size,), args.seconds, providers) for size in sizes}
    shown = ", ".join(f"batch {size} {rate:.0f}" for size, rate in rates.items())
    print(f"bare ONNX Runtime, images/s: {shown}")
    return {"shape": largest, "largest": rates[largest], "batch1": rates[1], "by_batch": rates}


def over_http(figures: dict[str, Any], settings: Settings, args: argparse.Namespace) -> None:
    """Both candidates over HTTP, each checked against the CPU service's answer."""
    spec = read_spec(MODELS / MODEL).input
    small = small_jpeg()
    tensor = prepare(small, spec, settings.max_pixels)
    loads = serving.workloads(MODEL, spec, small, serving.big_jpeg(), tensor)
    figures["decode_ceiling"] = serving.decode_ceiling(small, spec, settings.max_pixels, args.seconds)
    print(f"decode ceiling (every core, small JPEG): {figures['decode_ceiling']['images_per_s']:.0f} images/s")
    figures["gpu_limit"] = limits(tensor, settings, args)
    figures["connections"] = args.connections
    figures["candidates"] = {}
    for candidate in args.candidates:
        row = serving.candidate_figures(candidate, args.providers, MODEL, loads, tuple(args.connections), args.seconds)
        row["same_top5"], row["max_score_gap"] = serving.same_answers(row.pop("answers"), figures["cpu_answer"])
        print(
            f"{candidate}: {row['provider']}, top-5 equal to the CPU's: {row['same_top5']}, "
            f"largest score gap {row['max_score_gap']:.2g}; "
            f"GPU memory by process (MiB): {row['gpu_memory_mib'] or 'no nvidia-smi'}"
        )
        figures["candidates"][candidate] = row
    serving.print_ratios(figures)
    serving.print_goals(figures)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(models_dir=MODELS, providers=args.providers, default_model=MODEL)
    figures = await checks(settings, args)
    over_http(figures, settings, args)
    figures.pop("cpu_answer")
    figures["failures"] = failures(figures)
    return figures


def load_cuda_libraries() -> None:
    """onnxruntime-gpu finds CUDA and cuDNN in pip's nvidia packages through preload_dlls(); where
    PyTorch is installed too, it is imported first so that both use the same copies."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def csv_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--connections", type=csv_ints, default=list(serving.CONNECTIONS), help="e.g. 1,8,32,128")
    parser.add_argument(
        "--candidates", type=lambda t: t.split(","), default=list(serving.CANDIDATES), help="shared,per-process"
    )
    parser.add_argument(
        "--providers", choices=["cuda", "auto", "cpu"], default="cuda", help="cpu: run it all without a GPU"
    )
    args = parser.parse_args(argv)
    if args.providers != "cpu":
        load_cuda_libraries()
    figures = asyncio.run(measure(args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))
    if figures["failures"]:
        raise SystemExit("error: " + "; ".join(figures["failures"]))
    print("every check passed")


if __name__ == "__main__":
    main()
