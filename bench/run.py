"""The throughput benchmark: this service against bare ONNX Runtime (the limit) and a plain
FastAPI + ONNX Runtime peer written the tutorial way, on the same model files, under the same
load generator (wrk), in one run. Prints a table of ratios and writes the numbers to JSON.

Two references besides the peer, each measured before and after the servers run and taken at its
best: the limit is the bare session at batch 1 with ONNX Runtime's default threads; the ceiling is
decoding plus inference with no server at all, one process per core. The gap between the ceiling
and the service is what serving costs; the gap between the limit and the ceiling, what decoding costs.

    python -m bench.run --seconds 8 --connections 1,8,32
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from tqdm import tqdm

from app.serving.loader import read_spec
from app.serving.preprocess import prepare
from app.sizing import available_cpus

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
LUA = Path(__file__).resolve().parent / "post.lua"
READY_IN_A_ROW = 20


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    model: str
    filename: str
    media_type: str


WORKLOADS = [
    Workload("small_jpeg", "small JPEG (451x300)", "efficientnet_lite0", "small.jpg", "image/jpeg"),
    Workload("big_jpeg", "12-megapixel JPEG", "efficientnet_lite0", "big.jpg", "image/jpeg"),
    Workload("lenet_png", "28x28 PNG on LeNet-5", "lenet5", "lenet.png", "image/png"),
]


def make_inputs(folder: Path) -> None:
    """Real photos: scikit-image's chelsea as a JPEG, the same upscaled to 12 megapixels, and a
    Fashion-MNIST test image as a PNG."""
    import skimage.data

    from training.data import load_split

    chelsea = Image.open(Path(skimage.data.__file__).parent / "chelsea.png").convert("RGB")
    chelsea.save(folder / "small.jpg", quality=90)
    chelsea.resize((4240, 2832), Image.Resampling.BICUBIC).save(folder / "big.jpg", quality=90)
    Image.fromarray(load_split("test").images[0]).save(folder / "lenet.png")


def rate(call, images: int, seconds: float) -> float:
    """Images/s of ``call()``, which handles ``images`` images, repeated for ``seconds``."""
    call()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        runs += 1
    return runs * images / (time.perf_counter() - started)


def bare_limit(model: str, seconds: float) -> dict:
    """Images/s of the model alone, in-process, at batch 1 (for ``seconds``) and at the best of
    several batch sizes (a sixth of that each)."""
    i = json.loads((MODELS / model / "model.json").read_text())["input"]
    session = ort.InferenceSession(str(MODELS / model / "model.onnx"), providers=["CPUExecutionProvider"])
    rates = {}
    for batch in (1, 2, 4, 8, 16, 32):
        x = np.random.default_rng(0).standard_normal((batch, 1 if i["color"] == "L" else 3, i["height"], i["width"]))
        feed = {i["name"]: x.astype(np.float32)}
        rates[batch] = rate(lambda f=feed: session.run(None, f), batch, seconds if batch == 1 else seconds / 6)
    best = max(rates, key=rates.get)
    return {"batch1": rates[1], "best_batch": best, "best": rates[best], "by_batch": rates}


def best_of(before: dict, after: dict) -> dict:
    """The better of two measurements of each limit and ceiling: the machine is shared and noisy,
    and a ratio against a reference measured in a slow moment would flatter the service."""
    limits = {
        m: max(before["limits"][m], after["limits"][m], key=lambda limit: limit["batch1"])
        | {"measured": [before["limits"][m]["batch1"], after["limits"][m]["batch1"]]}
        for m in before["limits"]
    }
    ceilings = {w: max(before["ceilings"][w], after["ceilings"][w]) for w in before["ceilings"]}
    return {"limits": limits, "ceilings": ceilings}


def decode_and_infer(model: str, file: Path, seconds: float) -> float:
    """Images/s of one process decoding ``file`` and running a one-thread session on it, in a loop."""
    spec = read_spec(MODELS / model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(MODELS / model / "model.onnx"), options, providers=["CPUExecutionProvider"])
    data = file.read_bytes()
    call = lambda: session.run(None, {spec.input.name: prepare(data, spec.input, 10**9)})  # noqa: E731
    return rate(call, 1, seconds)


def serving_ceiling(workload: Workload, inputs: Path, seconds: float) -> float:
    """Images/s of decoding plus inference with no server: one process per core, all at once."""
    cores = available_cpus()
    jobs = [(workload.model, inputs / workload.filename, seconds)] * cores
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(pool.map(decode_and_infer, *zip(*jobs, strict=True)))


def references(models: list[str], workloads, inputs: Path, bar) -> dict:
    """The limit of each model and the ceiling of each workload, with progress."""
    limits, ceilings = {}, {}
    for model in models:
        bar.set_description(f"bare ONNX Runtime: {model}")
        limits[model] = bare_limit(model, 3.0)
        bar.update(1)
    for w in workloads:
        bar.set_description(f"ceiling: {w.key}")
        ceilings[w.key] = serving_ceiling(w, inputs, 3.0)
        bar.update(1)
    return {"limits": limits, "ceilings": ceilings}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict, ready_url: str) -> subprocess.Popen:
    """Started and ready: READY_IN_A_ROW answers of 200 on fresh connections, so that with several
    server processes (connections spread by the kernel) every one of them has loaded its models."""
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline, in_a_row = time.monotonic() + 120, 0
    while time.monotonic() < deadline and in_a_row < READY_IN_A_ROW:
        try:
            with urllib.request.urlopen(ready_url, timeout=2):
                in_a_row += 1
        except OSError:
            in_a_row = 0
            time.sleep(0.2)
    if in_a_row < READY_IN_A_ROW:
        process.kill()
        raise RuntimeError(f"{command} never became ready")
    return process


def start_service(env: dict) -> tuple[int, subprocess.Popen]:
    """``python -m app serve`` on a free loopback port, ready; quiet unless ``env`` says otherwise."""
    port = free_port()
    command = [sys.executable, "-m", "app", "serve", "--port", str(port)]
    return port, start(command, {"CNNSERVE_LOG_LEVEL": "warning", **env}, f"http://127.0.0.1:{port}/readyz")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def rss_mb(pid: int) -> float:
    """Resident memory of the process and all its descendants (the service's server processes)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    return own + sum(rss_mb(int(child)) for child in children)


def wrk(url: str, file: Path, media_type: str, connections: int, seconds: float) -> dict:
    env = {**os.environ, "BENCH_FILE": str(file), "BENCH_TYPE": media_type}
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(LUA),
        url,
    ]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(
        result[k] for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return result


def measure(server: str, url_for, inputs: Path, workloads, connections, seconds, bar) -> dict:
    results = {}
    for w in workloads:
        url = url_for(w)
        wrk(url, inputs / w.filename, w.media_type, 2, 1.0)  # warm-up
        for c in connections:
            bar.set_description(f"{server}: {w.key} at {c} connections")
            results[(w.key, c)] = wrk(url, inputs / w.filename, w.media_type, c, seconds)
            bar.update(1)
    return results


def run_peer(inputs, workloads, connections, seconds, bar) -> dict:
    results = {}
    for model in dict.fromkeys(w.model for w in workloads):
        port = free_port()
        peer = start(
            [sys.executable, "-m", "uvicorn", "bench.peer:app", "--port", str(port), "--log-level", "warning"],
            {"PEER_MODEL": model},
            f"http://127.0.0.1:{port}/docs",
        )
        try:
            mine = [w for w in workloads if w.model == model]
            results |= measure(
                "peer", lambda w, p=port: f"http://127.0.0.1:{p}/predict", inputs, mine, connections, seconds, bar
            )
        finally:
            stop(peer)
    return results


def run_service(inputs, workloads, connections, seconds, bar, env: dict) -> tuple[dict, dict]:
    port, service = start_service(env)
    try:
        memory = {"ready_mb": rss_mb(service.pid)}
        url = lambda w: f"http://127.0.0.1:{port}/classify?model={w.model}"  # noqa: E731
        results = measure("cnnserve", url, inputs, workloads, connections, seconds, bar)
        memory["after_mb"] = rss_mb(service.pid)
        memory["requests"] = sum(r["requests"] for r in results.values())
    finally:
        stop(service)
    return results, memory


def table(workloads, connections, limits, ceilings, peer, ours) -> str:
    head = (
        f"{'workload':<24}{'conns':>6}{'limit/s':>9}{'ceiling':>9}{'peer req/s':>11}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'ours req/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'x limit':>8}{'x ceil':>8}{'x peer':>8}{'errors':>8}"
    )
    lines = [head, "-" * len(head)]
    for w in workloads:
        limit, ceiling = limits[w.model]["batch1"], ceilings[w.key]
        for c in connections:
            p, o = peer[(w.key, c)], ours[(w.key, c)]
            lines.append(
                f"{w.title:<24}{c:>6}{limit:>9.0f}{ceiling:>9.0f}{p['rps']:>11.1f}{p['p50_us'] / 1e3:>8.1f}"
                f"{p['p99_us'] / 1e3:>8.1f}{o['rps']:>11.1f}{o['p50_us'] / 1e3:>8.1f}{o['p99_us'] / 1e3:>8.1f}"
                f"{o['rps'] / limit:>8.2f}{o['rps'] / ceiling:>8.2f}{o['rps'] / p['rps']:>8.2f}"
                f"{p['errors']:>4}/{o['errors']:<3}"
            )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each load run")
    parser.add_argument("--connections", default="1,8,32", help="comma-separated concurrent connections")
    parser.add_argument("--workloads", default=",".join(w.key for w in WORKLOADS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="CNNSERVE_X=V",
        help="a setting for this service's run (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk not found; install it: apt-get install wrk")
    connections = [int(c) for c in args.connections.split(",")]
    workloads = [w for w in WORKLOADS if w.key in args.workloads.split(",")]
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory() as scratch:
        inputs = Path(scratch)
        make_inputs(inputs)
        models = list(dict.fromkeys(w.model for w in workloads))
        with tqdm(total=2 * (len(workloads) * len(connections) + len(models) + len(workloads)), unit="run") as bar:
            before = references(models, workloads, inputs, bar)
            peer = run_peer(inputs, workloads, connections, args.seconds, bar)
            ours, memory = run_service(inputs, workloads, connections, args.seconds, bar, env)
            best = best_of(before, references(models, workloads, inputs, bar))
        limits, ceilings = best["limits"], best["ceilings"]
    print()
    for model, limit in limits.items():
        print(
            f"bare ONNX Runtime, {model}: batch 1 {limit['batch1']:.0f} images/s (measured "
            f"{' and '.join(f'{measured:.0f}' for measured in limit['measured'])}); "
            f"best batch {limit['best_batch']}: {limit['best']:.0f} images/s"
        )
    for w in workloads:
        print(f"ceiling, {w.title}: decoded, run in {available_cpus()} processes, no server: {ceilings[w.key]:.0f}/s")
    print(table(workloads, connections, limits, ceilings, peer, ours))
    print(
        f"cnnserve resident memory: {memory['ready_mb']:.0f} MB when ready, {memory['after_mb']:.0f} MB after "
        f"{memory['requests']} requests"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__},
        "settings": env,
        "seconds": args.seconds,
        "limits": limits,
        "ceilings": ceilings,
        "memory": memory,
        "runs": [
            {"server": server, "workload": key, "connections": c, **result}
            for server, results in (("peer", peer), ("cnnserve", ours))
            for (key, c), result in results.items()
        ],
    }
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
