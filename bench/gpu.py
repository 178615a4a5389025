"""The CUDA check and benchmark, for a machine with an NVIDIA GPU and onnxruntime-gpu (CI never runs
it on one): every model loads on the CUDA execution provider with the plan app/sizing.py gives it
(any model elsewhere, or refused, stops the script with an error, as CNNSERVE_PROVIDERS=cuda
stops the service: no silent fall-back to the CPU); the served top-5 on the sample photos equals
the PyTorch reference; the CUDA logits equal the CPU's within 1e-3, with the same top-5; and the
data plane (decoding, admission, batching, inference; no HTTP, as a GPU machine may have no load
generator) serves images per second against bare ONNX Runtime on the same GPU, for 1, 8 and 32
concurrent requests, with p50 and p99 latency and the batch sizes the batcher formed. Exits
non-zero if a check fails, after printing (and writing) every figure.

``--providers cpu`` runs all of it on the CPU (the comparison with the CPU is then trivially
equal): the test suite runs it so, briefly, where there is no GPU.

    python -m bench.gpu --seconds 5 --out gpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from app.config import Settings
from app.serving import services as wiring
from app.serving.preprocess import prepare
from app.serving.runtime import CPU, CUDA, CUDA_OPTIONS, choose_providers
from app.serving.services import Services
from training.photos import sample_photos

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MODEL = "efficientnet_lite0"
TOLERANCE = 2e-4  # the CPU suite's: ONNX Runtime against PyTorch, and the box resize against torchvision's
LOGIT_TOLERANCE = 1e-3  # CUDA against the CPU, on the same tensors
DEMANDED = {"cuda": CUDA, "cpu": CPU}  # --providers auto demands nothing
CONCURRENCY = (1, 8, 32)


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


async def served(services: Services, image: bytes, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    """Images/s of ``concurrency`` clients classifying ``image`` for ``seconds``, and each
    request's latency in seconds."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            await services.service.classify(MODEL, image, 5)
            latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return len(latencies) / (time.perf_counter() - started), latencies


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


def bare_figures(tensor: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Bare ONNX Runtime at batch 1 and 8; on CUDA also batches of 1 to 8 in turn, per search."""
    limit = {batch: bare_rate(tensor, (batch,), args.seconds, bare_providers(args.providers)) for batch in (1, 8)}
    print(f"bare ONNX Runtime: batch 1 {limit[1]:.0f} images/s, batch 8 {limit[8]:.0f} images/s")
    mixed = {}
    if isinstance(bare_providers(args.providers)[0], tuple):  # CUDA, with its options
        for search in (CUDA_OPTIONS["cudnn_conv_algo_search"], "HEURISTIC"):
            mixed[search] = bare_rate(tensor, tuple(range(1, 9)), args.seconds, bare_providers(args.providers, search))
            print(f"bare ONNX Runtime, batches of 1 to 8 in turn, {search} convolution search: {mixed[search]:.0f}/s")
    return {"bare_images_per_s": limit, "bare_mixed_images_per_s": mixed}


def batcher_sums(services: Services) -> dict[str, float]:
    """The batcher's own counts for the model so far: batches, images, seconds in ORT and queued."""
    value = services.metrics.registry.get_sample_value
    labels = {"model": MODEL}
    return {
        "batches": value("cnnserve_batch_size_count", labels) or 0.0,
        "images": value("cnnserve_batch_size_sum", labels) or 0.0,
        "inference": value("cnnserve_inference_duration_seconds_sum", labels) or 0.0,
        "queued": value("cnnserve_queue_duration_seconds_sum", labels) or 0.0,
    }


def batch_buckets(services: Services) -> dict[float, float]:
    """The batch-size histogram (app/metrics.py) for the model: batches so far at or below each bound."""
    return {
        float(sample.labels["le"]): sample.value
        for metric in services.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "cnnserve_batch_size_bucket" and sample.labels.get("model") == MODEL
    }


def batch_sizes(before: dict[float, float], after: dict[float, float]) -> dict[str, int]:
    """Batches run between two readings of the histogram, by size: "1", "2", "3-4", "5-8", ...
    (its buckets, which join sizes above 2), leaving out the sizes that never ran."""
    sizes, below, lower = {}, 0.0, 0
    for bound in sorted(after):
        count = after[bound] - before.get(bound, 0.0)
        if count > below:
            sizes[size_label(lower, bound)] = int(count - below)
        below, lower = count, lower if bound == math.inf else int(bound)
    return sizes


def size_label(lower: int, bound: float) -> str:
    """The sizes in the histogram bucket above ``lower`` up to ``bound``."""
    if bound == math.inf:
        return f"over {lower}"
    return str(lower + 1) if bound == lower + 1 else f"{lower + 1}-{int(bound)}"


async def served_figures(services: Services, image: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    """One concurrency's images/s, latency and batches, from the batcher's own metrics."""
    before, buckets = batcher_sums(services), batch_buckets(services)
    rate, latencies = await served(services, image, concurrency, seconds)
    spent = {key: value - before[key] for key, value in batcher_sums(services).items()}
    batches = max(spent["batches"], 1)
    p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99))
    return {
        "images_per_s": rate,
        "p50_ms": p50,
        "p99_ms": p99,
        "batch_sizes": batch_sizes(buckets, batch_buckets(services)),
        "images_per_batch": spent["images"] / batches,
        "ms_in_onnxruntime_per_batch": spent["inference"] / batches * 1000,
        "ms_queued_per_image": spent["queued"] / max(spent["images"], 1) * 1000,
    }


def served_line(concurrency: int, row: dict[str, Any], limit: dict[int, float]) -> str:
    batches = ", ".join(f"{size}: {n}" for size, n in row["batch_sizes"].items())
    return (
        f"data plane, small JPEG (451x300), {concurrency:2} at once: {row['images_per_s']:6.0f} images/s "
        f"(x{row['images_per_s'] / limit[1]:.2f} of bare batch 1, x{row['images_per_s'] / limit[8]:.2f} of batch 8), "
        f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms; batches by size {{{batches}}}, "
        f"{row['images_per_batch']:.1f} images a batch, {row['ms_in_onnxruntime_per_batch']:.2f} ms in "
        f"ONNX Runtime a batch, {row['ms_queued_per_image']:.2f} ms queued per image"
    )


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
    return found


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(models_dir=MODELS, providers=args.providers, default_model=MODEL)
    services = loaded(settings)
    figures: dict[str, Any] = {"device": ort.get_device(), "onnxruntime": ort.__version__}
    try:
        figures["models"] = check_models(services)
        require_providers(services, args.providers)
        figures["reference"] = await check_reference(services)
        figures["against_cpu"] = await compare_with_cpu(services)
        image = small_jpeg()
        tensor = prepare(image, services.repository.get(MODEL).spec.input, settings.max_pixels)
        figures |= bare_figures(tensor, args)
        figures["served"] = {}
        for concurrency in CONCURRENCY:
            row = await served_figures(services, image, concurrency, args.seconds)
            figures["served"][concurrency] = row
            print(served_line(concurrency, row, figures["bare_images_per_s"]))
    finally:
        await services.repository.close()
    figures["failures"] = failures(figures)
    return figures


def load_cuda_libraries() -> None:
    """onnxruntime-gpu finds CUDA and cuDNN in pip's nvidia packages through preload_dlls(); where
    PyTorch is installed too, it is imported first so that both use the same copies."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
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
