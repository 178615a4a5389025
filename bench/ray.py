"""cnnserve on Ray Serve against the native server, on this machine, in one run: small JPEGs on
EfficientNet-Lite0 (or 28x28 PNGs on LeNet-5, ``--model lenet5``: what Ray's hops cost, with next to
no inference) at 1 and 8 connections (wrk), requests/s, p50 and p99, CPU per request, and the ratios.

Three servers, one after the other, each given the whole machine:

- ``native``: ``python -m app serve`` (a server process per core);
- ``ray``: ``python -m app ray`` (a local Ray cluster in Ray's high-throughput mode; the model's
  deployment with a replica per core, one CPU each, behind the ingress), batching ours, inside the
  replica;
- ``ray-serve-batch``: the same application whose replica batches with Ray's ``@serve.batch``
  instead: the measurement that decides which to keep;
- ``ray-defaults``: ``ray`` with Ray's default mode (``CNNSERVE_RAY_THROUGHPUT_OPTIMIZED=false``):
  Ray's own HTTP proxy, user code on a thread of its own; the measurement behind the default.

    python -m bench.ray --seconds 6 --connections 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from tqdm import tqdm

from app.rayserve.replica import ModelReplica
from app.serving import postprocess, preprocess
from app.serving.schemas import ClassifyResponse
from bench import run as bench_run
from bench.run import free_port, make_inputs, wrk

INPUTS = {"efficientnet_lite0": ("small.jpg", "image/jpeg"), "lenet5": ("lenet.png", "image/png")}
READY_TIMEOUT_S = 180


class ServeBatchedReplica(ModelReplica):
    """Our replica with Ray's ``@serve.batch`` in place of our batcher: the image decoded on a
    thread, then Ray joins the waiting tensors into one ONNX Runtime call, as its docs show."""

    async def classify(self, image: bytes, top_k: int, version: str | None = None) -> ClassifyResponse:
        model = self.services.repository.get(self.name, version)
        work = preprocess.checked(image, model.spec.input, self.services.settings.max_pixels)
        tensor = await asyncio.to_thread(work) if callable(work) else work
        logits = await self.infer_batched(tensor)
        predictions = postprocess.top_k(logits, model.spec.output.kind, top_k, model.spec.labels)
        return ClassifyResponse(model=self.name, predictions=predictions)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def infer_batched(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
        model = self.services.repository.get(self.name)
        feed = {model.input.name: np.concatenate(tensors)}
        (logits,) = await asyncio.to_thread(model.session.run, [model.output.name], feed)
        return list(logits)


def commands(port: int, model: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each server's command and the environment it starts with."""
    python = sys.executable
    ray = ["--port", str(port), "--load-model", model, "--default-model", model, "--replicas", str(os.cpu_count())]
    on_ray = [python, "-m", "app", "ray", *ray, "--proxy-location", "HeadOnly"]
    return {
        "native": ([python, "-m", "app", "serve", "--port", str(port)], {}),
        "ray": (on_ray, {}),
        "ray-serve-batch": ([python, "-m", "bench.ray", "--serve-batched", *ray], {}),
        "ray-defaults": (on_ray, {"CNNSERVE_RAY_THROUGHPUT_OPTIMIZED": "false"}),
    }


def serve_batched(argv: list[str]) -> None:
    """``cnnserve ray`` with the replica above: the same options, the same application otherwise."""
    from app.cli import parse_args as cli_args
    from app.cli import ray_settings_of
    from app.rayserve.app import run

    settings = ray_settings_of(cli_args(["ray", *argv]))
    run(settings.model_copy(update={"ray_proxy_location": "HeadOnly"}), ServeBatchedReplica)


def start(command: list[str], env: dict[str, str], url: str) -> subprocess.Popen[bytes]:
    """Started in a session of its own (``stop`` ends everything it started: a Ray cluster) and ready."""
    quiet = {"CNNSERVE_LOG_LEVEL": "warning", **env}
    return bench_run.start(command, quiet, f"{url}/readyz", timeout=READY_TIMEOUT_S, own_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C as a user would (Ray's commands then delete the application and stop the cluster)."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (a local Ray cluster's raylet, workers and proxy included)."""
    try:
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []
    return [pid, *(d for child in children for d in descendants(child))]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of ``pid``'s whole tree so far: the cost of a request, whatever else
    the machine is doing (wall-clock rates are not comparable on a busy machine; CPU time mostly is)."""
    total = 0
    for process in descendants(pid):
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def measure(name: str, port: int, inputs: Path, args: argparse.Namespace, bar: tqdm) -> dict:
    url = f"http://127.0.0.1:{port}"
    bar.set_description(f"starting {name}")
    process = start(*commands(port, args.model)[name], url)
    try:
        target = f"{url}/classify?model={args.model}"
        filename, media_type = INPUTS[args.model]
        image = inputs / filename
        wrk(target, image, media_type, 2, 2.0)  # warm-up
        results = {}
        for connections in args.connections:
            bar.set_description(f"{name} at {connections} connection(s)")
            time.sleep(1.0)
            used = cpu_seconds(process.pid)
            run = wrk(target, image, media_type, connections, args.seconds)
            cpu_ms = (cpu_seconds(process.pid) - used) * 1e3 / max(1, run["requests"])
            results[connections] = {"rps": run["rps"], "p50_ms": run["p50_us"] / 1e3, "p99_ms": run["p99_us"] / 1e3}
            results[connections].update(errors=run["errors"], cpu_ms=cpu_ms)
            bar.update(1)
        return results
    finally:
        stop(process)


def report(results: dict[str, dict[int, dict[str, float]]]) -> str:
    native = results.get("native")
    header = f"{'server':<16} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>10} {'errors':>6}"
    lines = [f"{header}  vs native (req/s, p50, CPU per request)"]
    for name, runs in results.items():
        for c, run in runs.items():
            base = native[c] if native else None
            ratio = "  ".join(f"{run[k] / base[k]:.2f}x" for k in ("rps", "p50_ms", "cpu_ms")) if base else ""
            lines.append(
                f"{name:<16} {c:>5} {run['rps']:>8.1f} {run['p50_ms']:>8.2f} {run['p99_ms']:>8.2f} "
                f"{run['cpu_ms']:>10.2f} {run['errors']:>6}  {ratio if name != 'native' else ''}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ray", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="each wrk run (default 6)")
    parser.add_argument(
        "--connections", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8], help="default 1,8"
    )
    parser.add_argument(
        "--servers", default="native,ray,ray-serve-batch,ray-defaults", help="which to run, comma-separated"
    )
    parser.add_argument(
        "--model", choices=sorted(INPUTS), default="efficientnet_lite0", help="default efficientnet_lite0"
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-batched"]:
        serve_batched(argv[1:])
        return
    args = parse_args(argv)
    servers = args.servers.split(",")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        make_inputs(Path(scratch))
        with tqdm(total=len(servers) * len(args.connections), unit="run") as bar:
            for name in servers:
                port = free_port()
                results[name] = measure(name, port, Path(scratch), args, bar)
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
