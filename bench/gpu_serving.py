"""bench/gpu.py's measurements over HTTP: both candidates for an accelerator (CNNSERVE_FEED=shared,
server processes feeding one inference process per GPU; CNNSERVE_FEED=per-process, a session in
each server process), each a real ``python -m app serve`` under bench/http_load.py at 1, 8, 32 and
128 connections, on a small JPEG, a 12-megapixel JPEG and V2 binary tensors; beside them in the
same run the GPU limit (bare ONNX Runtime at the largest batch shape) and the host's decode ceiling
(decode and preprocess on every core, no server, no GPU); then the goals of issue 23, met or missed.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from app.serving.preprocess import prepare
from app.serving.spec import InputSpec
from app.sizing import available_cpus
from bench import http_load
from bench.run import free_port, start, stop
from training.photos import sample_photos

CANDIDATES = ("shared", "per-process")
CONNECTIONS = (1, 8, 32, 128)
TODAY_128 = 1123  # images/s served at 32 at once on the H200 before this work (README, "GPU")
SCORE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    request: http_load.Request


def workloads(model: str, spec: InputSpec, small: bytes, big: bytes, tensor: np.ndarray) -> list[Workload]:
    image = {"content-type": "image/jpeg"}
    return [
        Workload("small_jpeg", "small JPEG (451x300)", http_load.Request(f"/classify?model={model}", small, image)),
        Workload("big_jpeg", "12-megapixel JPEG", http_load.Request(f"/classify?model={model}", big, image)),
        Workload("v2_binary", "V2 binary tensor", v2_request(model, spec, tensor)),
    ]


def v2_request(model: str, spec: InputSpec, tensor: np.ndarray) -> http_load.Request:
    """One preprocessed image as the Open Inference Protocol's binary-data extension sends it."""
    raw = np.ascontiguousarray(tensor, np.float32).tobytes()
    header = {
        "inputs": [
            {
                "name": spec.name,
                "shape": list(tensor.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    headers = {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return http_load.Request(f"/v2/models/{model}/infer", head + raw, headers)


def big_jpeg() -> bytes:
    buffer = io.BytesIO()
    chelsea = Image.open(sample_photos()["chelsea"]).convert("RGB")
    chelsea.resize((4240, 2832), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# -- the host's decode ceiling -------------------------------------------------------------------


def decoding(image: bytes, spec: InputSpec, max_pixels: int, seconds: float) -> float:
    """Images/s one process decodes and preprocesses ``image`` into a tensor."""
    prepare(image, spec, max_pixels)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        prepare(image, spec, max_pixels)
        count += 1
    return count / (time.perf_counter() - started)


def decode_ceiling(image: bytes, spec: InputSpec, max_pixels: int, seconds: float) -> dict[str, float]:
    """Decode + preprocess on every core at once (no server, no GPU), and one image's time on one."""
    cpus = available_cpus()
    with ProcessPoolExecutor(cpus) as pool:
        rates = list(pool.map(decoding, *zip(*[(image, spec, max_pixels, seconds)] * cpus, strict=True)))
    return {"images_per_s": sum(rates), "ms_one_core": 1000 / decoding(image, spec, max_pixels, seconds)}


# -- the candidates over HTTP ---------------------------------------------------------------------


def serve(candidate: str, providers: str, model: str) -> tuple[int, subprocess.Popen[bytes]]:
    """``python -m app serve`` with one model, as the candidate deploys it; a queue long enough for
    128 closed-loop clients (the benchmark measures throughput, not shedding)."""
    port = free_port()
    env = {
        "CNNSERVE_FEED": candidate,
        "CNNSERVE_PROVIDERS": providers,
        "CNNSERVE_MODEL_CONTROL": "explicit",
        "CNNSERVE_LOAD_MODELS": model,
        "CNNSERVE_DEFAULT_MODEL": model,
        "CNNSERVE_GRPC_PORT": "0",
        "CNNSERVE_MAX_QUEUE": "512",
        "CNNSERVE_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "app", "serve", "--port", str(port)]
    return port, start(command, env, f"http://127.0.0.1:{port}/readyz", timeout=900)


def served_model(port: int, model: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/models/{model}", timeout=30) as response:
        info: dict[str, Any] = json.load(response)
        return info


def classify(port: int, model: str, image: bytes) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/classify?model={model}&top_k=5", data=image, headers={"content-type": "image/jpeg"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        predictions: list[dict[str, Any]] = json.load(response)["predictions"]
        return predictions


def gpu_memory() -> dict[str, float]:
    """MiB of GPU memory each process holds, from nvidia-smi (empty without it)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
    rows = [line.split(",") for line in out.splitlines() if line.strip()]
    return {pid.strip(): float(mib) for pid, mib in rows}


def candidate_figures(
    candidate: str, providers: str, model: str, loads: list[Workload], connections: tuple[int, ...], seconds: float
) -> dict[str, Any]:
    """One candidate: its provider and answers checked over HTTP, GPU memory, then every load."""
    port, server = serve(candidate, providers, model)
    try:
        figures: dict[str, Any] = {"provider": served_model(port, model)["provider"], "gpu_memory_mib": gpu_memory()}
        figures["answers"] = classify(port, model, loads[0].request.body)
        figures["runs"] = {}
        for load in loads:
            for count in connections:
                row = http_load.run(port, load.request, count, seconds)
                figures["runs"][f"{load.key}@{count}"] = row
                print(run_line(candidate, load, count, row), flush=True)
    finally:
        stop(server)
    return figures


def run_line(candidate: str, load: Workload, connections: int, row: dict[str, Any]) -> str:
    errors = f", errors {row['errors']}" if row["errors"] else ""
    return (
        f"{candidate:11} {load.title:20} {connections:3} connections: {row['rps']:7.0f} images/s, "
        f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms{errors}"
    )


def same_answers(ours: list[dict[str, Any]], reference: list[Any]) -> tuple[bool, float]:
    """Whether the served top-5 equals the CPU service's, and the largest score difference."""
    same = [p["index"] for p in ours] == [p.index for p in reference]
    gap = max(abs(p["score"] - r.score) for p, r in zip(ours, reference, strict=True))
    return same, gap


# -- goals ----------------------------------------------------------------------------------------


def goals(figures: dict[str, Any], candidate: str) -> list[tuple[str, bool, str]]:
    """Issue 23's goals for one candidate: (what, met, the figures)."""
    runs, limit = figures["candidates"][candidate]["runs"], figures["gpu_limit"]
    ceiling, largest = figures["decode_ceiling"]["images_per_s"], max(figures["connections"])
    found = []
    small = runs.get(f"small_jpeg@{largest}")
    if small:
        bound = 0.8 * min(limit["largest"], ceiling)
        found.append(
            (
                f"small JPEG at {largest} connections >= 0.8 x min(GPU limit, decode ceiling) and >= 3 x {TODAY_128}",
                small["rps"] >= bound and small["rps"] >= 3 * TODAY_128,
                f"{small['rps']:.0f} against {bound:.0f} and {3 * TODAY_128}",
            )
        )
    tensors = runs.get(f"v2_binary@{largest}")
    if tensors:
        bound = 0.7 * limit["largest"]
        found.append(
            (
                f"V2 binary at {largest} >= 0.7 x GPU limit",
                tensors["rps"] >= bound,
                f"{tensors['rps']:.0f} against {bound:.0f}",
            )
        )
    one = runs.get("small_jpeg@1")
    if one:
        bound = 1.3 * (figures["decode_ceiling"]["ms_one_core"] + 1000 / limit["batch1"])
        found.append(
            (
                "one client, small JPEG: p50 <= 1.3 x (decode + bare batch 1)",
                one["p50_ms"] <= bound,
                f"{one['p50_ms']:.2f} ms against {bound:.2f} ms",
            )
        )
    for key, row in runs.items():
        if int(key.split("@")[1]) >= 32 and not key.startswith("big_jpeg"):
            met = row["p99_ms"] <= 2 * row["p50_ms"]
            found.append((f"p99 <= 2 x p50, {key}", met, f"{row['p99_ms']:.1f} / {row['p50_ms']:.1f} ms"))
    return found


def print_goals(figures: dict[str, Any]) -> None:
    gpu = figures["provider"] != "CPUExecutionProvider"
    print(
        "\ngoals of issue 23"
        + ("" if gpu else " (set for an H200; this run is on the CPU, so they are shown, not judged)")
    )
    for candidate in figures["candidates"]:
        for what, met, text in goals(figures, candidate):
            print(f"  {candidate:11} {'met   ' if met else 'MISSED'} {what}: {text}")


def print_ratios(figures: dict[str, Any]) -> None:
    """Each candidate's images/s against the GPU limit and the decode ceiling, and who served more."""
    limit, ceiling = figures["gpu_limit"]["largest"], figures["decode_ceiling"]["images_per_s"]
    print(
        f"\nGPU limit (bare, batch {figures['gpu_limit']['shape']}) {limit:.0f} images/s; "
        f"decode ceiling {ceiling:.0f} images/s"
    )
    keys = list(next(iter(figures["candidates"].values()))["runs"])
    for key in keys:
        rates = {c: f["runs"][key]["rps"] for c, f in figures["candidates"].items()}
        shown = ", ".join(
            f"{c} {r:.0f} (x{r / limit:.2f} GPU limit, x{r / ceiling:.2f} ceiling)" for c, r in rates.items()
        )
        print(f"  {key:16} {shown}; more: {max(rates, key=rates.__getitem__)}")
