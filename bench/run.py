"""The throughput benchmark: this service against bare ONNX Runtime and a plain FastAPI + ONNX
Runtime peer written the tutorial way, on the same model files, under the same load generator
(wrk), in one run, deployed three ways (``--modes``):

- ``serve``: ``python -m app serve``, a server process per core (app/sizing.py), as deployed;
- ``one-core``: one process, ``uvicorn app.main:app``, pinned to one core (a container given one CPU);
- ``one-process``: the same one process with every core.

The peer is one process, pinned to the same core in one-core mode and unpinned otherwise (serve
and one-process share its runs). Three references, measured under each pinning before and after
the servers run and taken at their best: the limit (the bare session at batch 1, one thread per
core); bare ONNX Runtime + decode (one process decoding and inferring with every core at batch 1:
what a lone client should wait for); and the ceiling (decoding plus inference with no server, one
process per core). The gap between the ceiling and the service is what serving costs.

Prints the references, a table per mode and the goals, met or MISSED (bench/report.py renders
them from the JSON record it writes).

    python -m bench.run --seconds 6 --connections 1,8,32 --modes serve,one-core,one-process
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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image
from tqdm import tqdm

from app.serving.loader import read_spec
from app.serving.preprocess import prepare
from app.sizing import available_cpus
from bench.report import render

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
LUA = Path(__file__).resolve().parent / "post.lua"
READY_IN_A_ROW = 20
SETTLE_SECONDS = 1.0  # between load runs
Runs = dict[tuple[str, int], dict[str, Any]]


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


@dataclass(frozen=True)
class Mode:
    """One way to deploy the service: what ``python -m`` runs, and whether it (with the peer and
    the references it is compared with) is pinned to one core."""

    key: str
    title: str  # {cores}: how many the machine gives this process
    args: tuple[str, ...]
    one_core: bool

    @property
    def pinning(self) -> str:
        return "one_core" if self.one_core else "all_cores"


UVICORN = ("uvicorn", "app.main:app", "--log-level", "warning")
MODES = [
    Mode("serve", "serve, a process per core", ("app", "serve"), one_core=False),
    Mode("one-core", "1 process, 1 core", UVICORN, one_core=True),
    Mode("one-process", "1 process, {cores} cores", UVICORN, one_core=False),
]


@dataclass(frozen=True)
class Pinning:
    """The cores the servers and references run on, and those left to the load generator (when
    the servers get one core, wrk keeps off it, so that it measures one core of serving)."""

    key: str
    title: str
    cores: frozenset[int]
    load: frozenset[int] | None


@dataclass
class Bench:
    """What every load run of one benchmark shares."""

    inputs: Path
    workloads: list[Workload]
    connections: list[int]
    seconds: float
    reference_seconds: float
    bar: Any  # tqdm


def pinnings(modes: list[Mode]) -> dict[str, Pinning]:
    """The pinnings the modes need: the first core this process may use, or all of them."""
    every = frozenset(os.sched_getaffinity(0))
    first = frozenset({min(every)})
    known = {
        "one_core": Pinning("one_core", f"1 core (core {min(every)})", first, (every - first) or None),
        "all_cores": Pinning("all_cores", f"{len(every)} cores (unpinned)", every, None),
    }
    return {m.pinning: known[m.pinning] for m in modes}


def pin(cores: frozenset[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that pins a child process to ``cores`` (None: as this process is)."""
    return None if cores is None else partial(os.sched_setaffinity, 0, cores)


def make_inputs(folder: Path) -> None:
    """Real photos: scikit-image's chelsea as a JPEG, the same upscaled to 12 megapixels, and a
    Fashion-MNIST test image as a PNG."""
    import skimage.data

    from training.data import load_split

    chelsea = Image.open(Path(skimage.data.__file__).parent / "chelsea.png").convert("RGB")
    chelsea.save(folder / "small.jpg", quality=90)
    chelsea.resize((4240, 2832), Image.Resampling.BICUBIC).save(folder / "big.jpg", quality=90)
    Image.fromarray(load_split("test").images[0]).save(folder / "lenet.png")


# -- the references, each in processes pinned as the servers they are compared with ----------------


def rate(call: Callable[[], object], images: int, seconds: float) -> float:
    """Images/s of ``call()``, which handles ``images`` images, repeated for ``seconds``."""
    call()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        runs += 1
    return runs * images / (time.perf_counter() - started)


def session(model: str, threads: int) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads; 0: one per core this process may use, set
    explicitly because ONNX Runtime's default counts the host's cores, not the affinity mask."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cpus()
    return ort.InferenceSession(str(MODELS / model / "model.onnx"), options, providers=["CPUExecutionProvider"])


def bare_limit(model: str, seconds: float) -> dict[str, Any]:
    """Images/s of the model alone, in-process, with every core, at batch 1 (for ``seconds``) and
    at the best of several batch sizes (a sixth of that each)."""
    i = json.loads((MODELS / model / "model.json").read_text())["input"]
    bare = session(model, 0)
    rates = {}
    for batch in (1, 2, 4, 8, 16, 32):
        x = np.random.default_rng(0).standard_normal((batch, 1 if i["color"] == "L" else 3, i["height"], i["width"]))
        feed = {i["name"]: x.astype(np.float32)}
        rates[batch] = rate(lambda f=feed: bare.run(None, f), batch, seconds if batch == 1 else seconds / 6)
    best = max(rates, key=lambda b: rates[b])
    return {"batch1": rates[1], "best_batch": best, "best": rates[best], "by_batch": rates}


def decode_and_infer(model: str, file: Path, seconds: float, threads: int = 1) -> float:
    """Images/s of one process decoding ``file`` and running a session of ``threads`` threads (0:
    every core) on it, in a loop, at batch 1."""
    spec = read_spec(MODELS / model)
    bare, data = session(model, threads), file.read_bytes()
    return rate(lambda: bare.run(None, {spec.input.name: prepare(data, spec.input, 10**9)}), 1, seconds)


def pinned_pool(cores: frozenset[int], workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=os.sched_setaffinity, initargs=(0, cores)
    )


def serving_ceiling(workload: Workload, inputs: Path, seconds: float, cores: frozenset[int]) -> float:
    """Images/s of decoding plus inference with no server: one process per core, all at once."""
    jobs = [(workload.model, inputs / workload.filename, seconds)] * len(cores)
    with pinned_pool(cores, len(cores)) as pool:
        return sum(pool.map(decode_and_infer, *zip(*jobs, strict=True)))


def references(bench: Bench, pinning: Pinning) -> dict[str, Any]:
    """The limit of each model, and bare ONNX Runtime + decode and the ceiling of each workload,
    measured on the pinning's cores, with progress."""
    models = list(dict.fromkeys(w.model for w in bench.workloads))
    limits, decoded, ceilings = {}, {}, {}
    with pinned_pool(pinning.cores, 1) as pool:
        for model in models:
            bench.bar.set_description(f"bare ONNX Runtime on {pinning.title}: {model}")
            limits[model] = pool.submit(bare_limit, model, bench.reference_seconds).result()
            bench.bar.update(1)
        for w in bench.workloads:
            bench.bar.set_description(f"bare ONNX Runtime + decode on {pinning.title}: {w.key}")
            file = bench.inputs / w.filename
            decoded[w.key] = pool.submit(decode_and_infer, w.model, file, bench.reference_seconds, 0).result()
            bench.bar.update(1)
    for w in bench.workloads:
        bench.bar.set_description(f"ceiling on {pinning.title}: {w.key}")
        ceilings[w.key] = serving_ceiling(w, bench.inputs, bench.reference_seconds, pinning.cores)
        bench.bar.update(1)
    return {"limits": limits, "decoded": decoded, "ceilings": ceilings}


def best_of(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The better of two measurements of each reference: the machine is shared and noisy, and a
    ratio against a reference measured in a slow moment would flatter the service."""
    limits = {
        m: max(before["limits"][m], after["limits"][m], key=lambda limit: limit["batch1"])
        | {"measured": [before["limits"][m]["batch1"], after["limits"][m]["batch1"]]}
        for m in before["limits"]
    }
    best: dict[str, Any] = {"limits": limits, "measured": {}}
    for kind in ("decoded", "ceilings"):
        best[kind] = {w: max(before[kind][w], after[kind][w]) for w in before[kind]}
        best["measured"][kind] = {w: [before[kind][w], after[kind][w]] for w in before[kind]}
    return best


# -- the servers and the load -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    command: list[str],
    env: dict,
    ready_url: str,
    cores: frozenset[int] | None = None,
    *,
    cwd: Path = ROOT,
    timeout: float = 120.0,
    own_session: bool = False,
) -> subprocess.Popen:
    """Started (pinned to ``cores`` if given; in a session of its own, so that ``os.killpg`` stops
    all it starts, if ``own_session``) and ready: READY_IN_A_ROW answers of 200 on fresh
    connections, so that with several server processes (connections spread by the kernel) every
    one of them has loaded its models. A process that exits first fails at once."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=pin(cores),
        start_new_session=own_session,
    )
    deadline, in_a_row = time.monotonic() + timeout, 0
    while in_a_row < READY_IN_A_ROW:
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError(f"{' '.join(command)} never became ready")
        try:
            with urllib.request.urlopen(ready_url, timeout=2):
                in_a_row += 1
        except OSError:
            in_a_row = 0
            time.sleep(0.2)
    return process


def start_service(
    env: dict, args: tuple[str, ...] = ("app", "serve"), cores: frozenset[int] | None = None
) -> tuple[int, subprocess.Popen]:
    """``python -m app serve`` (or ``args``) on a free loopback port, ready; quiet unless ``env``
    says otherwise."""
    port = free_port()
    command = [sys.executable, "-m", *args, "--port", str(port)]
    return port, start(command, {"CNNSERVE_LOG_LEVEL": "warning", **env}, f"http://127.0.0.1:{port}/readyz", cores)


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


def wrk(
    url: str, file: Path, media_type: str, connections: int, seconds: float, cores: frozenset[int] | None = None
) -> dict[str, Any]:
    env = {**os.environ, "BENCH_FILE": str(file), "BENCH_TYPE": media_type}
    duration = f"-d{max(1, round(seconds))}s"
    command = ["wrk", "-t1", f"-c{connections}", duration, "--timeout", "30s", "-s", str(LUA), url]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, preexec_fn=pin(cores))
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(
        result[k] for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return result


def measure(
    server: str,
    url_for: Callable[[Workload], str],
    bench: Bench,
    workloads: list[Workload],
    load: frozenset[int] | None,
) -> Runs:
    """wrk against each workload at each connection count, after a one-second warm-up. Each run
    starts SETTLE_SECONDS after the last: wrk hangs up on the requests it has in flight when it
    stops, and a server still working through them (a 12-megapixel queue takes most of a second)
    would meet the next run with less capacity than it has."""
    results = {}
    for w in workloads:
        url = url_for(w)
        wrk(url, bench.inputs / w.filename, w.media_type, 2, 1.0, load)
        for c in bench.connections:
            bench.bar.set_description(f"{server}: {w.key} at {c} connections")
            time.sleep(SETTLE_SECONDS)
            results[(w.key, c)] = wrk(url, bench.inputs / w.filename, w.media_type, c, bench.seconds, load)
            bench.bar.update(1)
    return results


def run_peer(bench: Bench, pinning: Pinning) -> Runs:
    """The peer, one process per model (it serves one), on the pinning's cores. On one core its
    session gets one thread: ONNX Runtime's default pins a thread to every core of the host,
    escaping the process's affinity mask (measured: the peer pinned to one core served 147 small
    JPEGs a second, against a one-core ceiling of 127)."""
    results = {}
    for model in dict.fromkeys(w.model for w in bench.workloads):
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "bench.peer:app", "--port", str(port), "--log-level", "warning"]
        env = {"PEER_MODEL": model} | ({"PEER_THREADS": str(len(pinning.cores))} if pinning.load else {})
        peer = start(command, env, f"http://127.0.0.1:{port}/docs", pinning.cores)
        try:
            mine = [w for w in bench.workloads if w.model == model]
            url = lambda w, p=port: f"http://127.0.0.1:{p}/predict"  # noqa: E731
            results |= measure(f"peer on {pinning.title}", url, bench, mine, pinning.load)
        finally:
            stop(peer)
    return results


def run_service(bench: Bench, env: dict, mode: Mode, pinning: Pinning) -> tuple[Runs, dict[str, Any]]:
    """The service in one mode, with its resident memory when ready and after the load."""
    port, service = start_service(env, mode.args, pinning.cores)
    try:
        memory = {"ready_mb": rss_mb(service.pid)}
        url = lambda w: f"http://127.0.0.1:{port}/classify?model={w.model}"  # noqa: E731
        results = measure(f"cnnserve {mode.key}", url, bench, bench.workloads, pinning.load)
        memory["after_mb"] = rss_mb(service.pid)
        memory["requests"] = sum(r["requests"] for r in results.values())
    finally:
        stop(service)
    return results, memory


def flat(results: Runs, **about: str) -> list[dict[str, Any]]:
    return [{**about, "workload": key, "connections": c, **result} for (key, c), result in results.items()]


def run_all(bench: Bench, modes: list[Mode], pins: dict[str, Pinning], env: dict) -> dict[str, Any]:
    """References before, the peer once per pinning, the service in each mode, references after:
    the record bench/report.py renders."""
    before = {key: references(bench, pinning) for key, pinning in pins.items()}
    runs = []
    for key, pinning in pins.items():
        runs += flat(run_peer(bench, pinning), server="peer", pinning=key)
    described = {}
    for mode in modes:
        ours, memory = run_service(bench, env, mode, pins[mode.pinning])
        runs += flat(ours, server="cnnserve", mode=mode.key, pinning=mode.pinning)
        command = ["python", "-m", *mode.args]
        title = mode.title.format(cores=len(pins[mode.pinning].cores))
        described[mode.key] = {"title": title, "command": command, "pinning": mode.pinning, "memory": memory}
    after = {key: references(bench, pinning) for key, pinning in pins.items()}
    return {
        "workloads": [{"key": w.key, "title": w.title, "model": w.model} for w in bench.workloads],
        "connections": bench.connections,
        "pinnings": {key: {"title": p.title, "cores": sorted(p.cores)} for key, p in pins.items()},
        "references": {key: best_of(before[key], after[key]) for key in pins},
        "modes": described,
        "runs": runs,
    }


# -- the command ------------------------------------------------------------------------------------

SERVICE_START_S, PEER_START_S, SPAWN_S, WARM_UP_S, RUN_OVERHEAD_S = 5.0, 2.0, 1.0, 1.2, 0.3  # measured on 2 cores


def expected_seconds(args: argparse.Namespace) -> float:
    """About how long a run takes: the load runs, the server starts and the references (each
    estimated from its seconds and the cost of starting its processes)."""
    modes, workloads, connections = chosen(args)
    seconds, reference = args.seconds, args.reference_seconds
    pins, models = {m.pinning for m in modes}, {w.model for w in workloads}
    per_workload = len(connections) * (max(1, round(seconds)) + RUN_OVERHEAD_S) + WARM_UP_S
    loads = (len(modes) + len(pins)) * len(workloads) * per_workload
    starts = len(modes) * SERVICE_START_S + len(pins) * len(models) * PEER_START_S
    one_reference = SPAWN_S + 2 * reference * len(models) + len(workloads) * (2 * reference + SPAWN_S)
    return loads + starts + 2 * len(pins) * one_reference


def known(options: str, choices: list[str]) -> list[str]:
    """A comma-separated choice of names, each one of ``choices`` (argparse reports the rest)."""
    chosen = options.split(",")
    unknown = [c for c in chosen if c not in choices]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(choices)}")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    modes, workloads = [m.key for m in MODES], [w.key for w in WORKLOADS]
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each load run")
    parser.add_argument(
        "--reference-seconds", type=float, default=3.0, help="length of each reference's measurement (about)"
    )
    parser.add_argument("--connections", default="1,8,32", help="comma-separated concurrent connections")
    parser.add_argument(
        "--workloads", type=partial(known, choices=workloads), default=workloads, help=",".join(workloads)
    )
    parser.add_argument("--modes", type=partial(known, choices=modes), default=modes, help=",".join(modes))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--env", action="append", default=[], metavar="CNNSERVE_X=V", help="a setting for the service (repeatable)"
    )
    return parser.parse_args(argv)


def chosen(args: argparse.Namespace) -> tuple[list[Mode], list[Workload], list[int]]:
    """The modes, workloads and connection counts the command line asks for, in the usual order."""
    modes = [m for m in MODES if m.key in args.modes]
    workloads = [w for w in WORKLOADS if w.key in args.workloads]
    return modes, workloads, [int(c) for c in args.connections.split(",")]


def progress_total(args: argparse.Namespace) -> int:
    """The steps of the progress bar: each reference measured, each load run."""
    modes, workloads, connections = chosen(args)
    pins, models = len({m.pinning for m in modes}), len({w.model for w in workloads})
    return 2 * pins * (models + 2 * len(workloads)) + (len(modes) + pins) * len(workloads) * len(connections)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk not found; install it: apt-get install wrk")
    modes, workloads, connections = chosen(args)
    env = dict(item.split("=", 1) for item in args.env)
    print(f"expected duration: about {expected_seconds(args) / 60:.1f} min")
    with tempfile.TemporaryDirectory() as scratch, tqdm(total=progress_total(args), unit="run") as bar:
        make_inputs(Path(scratch))
        bench = Bench(Path(scratch), workloads, connections, args.seconds, args.reference_seconds, bar)
        record = run_all(bench, modes, pinnings(modes), env)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__}
    record = {"machine": machine, "settings": env, "seconds": args.seconds, **record}
    record["reference_seconds"] = args.reference_seconds
    print()
    print(render(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
