"""The CUDA check and benchmark, for a machine with an NVIDIA GPU and onnxruntime-gpu (CI never runs
it): every model loads on the CUDA execution provider with the plan app/sizing.py gives it, the
served top-5 on the sample photos equals the PyTorch reference, and the data plane (decoding,
admission, batching, inference; no HTTP, as a GPU machine may have no load generator) serves
images per second against bare ONNX Runtime on the same GPU, for 1, 8 and 32 concurrent requests.

    python -m bench.gpu --seconds 5 --out gpu.json
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
from app.serving.preprocess import prepare
from app.serving.runtime import CUDA, CUDA_OPTIONS
from app.serving.services import Services
from training.photos import sample_photos

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MODEL = "efficientnet_lite0"
TOLERANCE = 2e-4  # the CPU suite's: ONNX Runtime against PyTorch, and the box resize against torchvision's


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


async def served_rate(services: Services, image: bytes, concurrency: int, seconds: float) -> float:
    done, stop_at = 0, time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await services.service.classify(MODEL, image, 5)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return done / (time.perf_counter() - started)


def bare_rate(tensor: np.ndarray, batches: tuple[int, ...], seconds: float, search: str = "") -> float:
    """Images/s of the model alone on the GPU, running batches of the given sizes in turn: the
    limit at one size, or what changing shapes (as a dynamic batcher makes) cost ONNX Runtime and
    cuDNN, with the service's convolution algorithm search or another one."""
    options = {**CUDA_OPTIONS, **({"cudnn_conv_algo_search": search} if search else {})}
    session = ort.InferenceSession(
        str(MODELS / MODEL / "model.onnx"), providers=[(CUDA, options), "CPUExecutionProvider"]
    )
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


def small_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.open(sample_photos()["chelsea"]).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(models_dir=MODELS, providers=args.providers, default_model=MODEL)
    services = loaded(settings)
    figures: dict[str, Any] = {"device": ort.get_device(), "onnxruntime": ort.__version__}
    figures["models"] = check_models(services)
    figures["reference"] = await check_reference(services)
    image = small_jpeg()
    spec = services.repository.get(MODEL).spec.input
    tensor = prepare(image, spec, 10**8)
    limit = {batch: bare_rate(tensor, (batch,), args.seconds) for batch in (1, 8)}
    mixed = tuple(range(1, 9))
    figures["bare_images_per_s"] = limit
    figures["bare_mixed_images_per_s"] = {
        search or CUDA_OPTIONS["cudnn_conv_algo_search"]: bare_rate(tensor, mixed, args.seconds, search)
        for search in ("", "HEURISTIC")
    }
    figures["served_images_per_s"] = {}
    print(f"bare ONNX Runtime on the GPU: batch 1 {limit[1]:.0f} images/s, batch 8 {limit[8]:.0f} images/s")
    for search, rate in figures["bare_mixed_images_per_s"].items():
        print(f"bare ONNX Runtime, batches of 1 to 8 in turn, {search} convolution search: {rate:.0f} images/s")
    for concurrency in (1, 8, 32):
        before = batcher_sums(services)
        rate = await served_rate(services, image, concurrency, args.seconds)
        spent = {key: value - before[key] for key, value in batcher_sums(services).items()}
        figures["served_images_per_s"][concurrency] = rate
        batches = max(spent["batches"], 1)
        print(
            f"data plane, small JPEG (451x300), {concurrency:2} at once: {rate:6.0f} images/s, "
            f"x{rate / limit[1]:.2f} of bare batch 1, x{rate / limit[8]:.2f} of bare batch 8; "
            f"{spent['images'] / batches:.1f} images a batch, {spent['inference'] / batches * 1000:.2f} ms in "
            f"ONNX Runtime and {spent['queued'] / max(spent['images'], 1) * 1000:.2f} ms queued per image"
        )
    await services.repository.close()
    return figures


def load_cuda_libraries() -> None:
    """onnxruntime-gpu finds CUDA and cuDNN in pip's nvidia packages through preload_dlls(); where
    PyTorch is installed too, it is imported first so that both use the same copies."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--providers", choices=["cuda", "auto", "cpu"], default="cuda", help="cpu: try it without a GPU"
    )
    args = parser.parse_args(argv)
    if args.providers != "cpu":
        load_cuda_libraries()
    figures = asyncio.run(measure(args))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
