"""Long runs against a real server on loopback, kept out of the test suite because they take
minutes: the soak (many mixed requests, good and bad, and the resident-memory growth they leave),
the overload (64 clients sending 12-megapixel photos at once: what is refused, how fast the
accepted ones come back, and whether /healthz stays quick meanwhile) and the model cycles (a model
unloaded and loaded again through the repository API, many times: the memory a retired model
leaves behind).

    python -m bench.stress soak --requests 50000
    python -m bench.stress overload --clients 64 --seconds 30
    python -m bench.stress overload --path /featuremaps --seconds 20 --timeout 10
    python -m bench.stress overload --path /featuremaps --ignore-retry-after --client-nice 19
    python -m bench.stress featurecost      # start-up, and what feature maps cost /classify
    python -m bench.stress cycles --cycles 50 --model efficientnet_lite0
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.refusals import WARMING_CONNECTIONS, probe_answers, start_probe
from bench.run import make_inputs, rss_mb, start_service, stop

WARM_CYCLES = 5  # unload/load cycles before the memory that later ones must not grow is taken


@dataclass(frozen=True)
class Call:
    kind: str
    method: str
    path: str
    body: bytes | None = None
    media_type: str | None = None


def mixed_calls(inputs: Path) -> list[tuple[Call, int]]:
    """What a public service meets: mostly good requests, some broken ones, weighted."""
    lenet_png, small_jpg = (inputs / "lenet.png").read_bytes(), (inputs / "small.jpg").read_bytes()
    tensor = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}]}
    ).encode()
    return [
        (Call("classify lenet5", "POST", "/classify?model=lenet5", lenet_png, "image/png"), 40),
        (Call("classify efficientnet", "POST", "/classify", small_jpg, "image/jpeg"), 10),
        (Call("featuremaps kernels", "POST", "/featuremaps?model=kernels&format=json", lenet_png, "image/png"), 5),
        (Call("v2 infer lenet5", "POST", "/v2/models/lenet5/infer", tensor, "application/json"), 10),
        (Call("truncated image", "POST", "/classify?model=lenet5", lenet_png[:60], "image/png"), 5),
        (Call("not an image", "POST", "/classify?model=lenet5", b"hello", "text/plain"), 5),
        (Call("unknown model", "POST", "/classify?model=nope", lenet_png, "image/png"), 5),
        (Call("bad top_k", "POST", "/classify?model=lenet5&top_k=0", lenet_png, "image/png"), 5),
        (Call("models", "GET", "/models"), 10),
        (Call("metrics", "GET", "/metrics"), 5),
    ]


class Connection:
    """One keep-alive connection, reopened when the server closes it."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.port, self.timeout = port, timeout
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def send(self, call: Call) -> tuple[int | str, float]:
        status, seconds, _ = self.exchange(call)
        return status, seconds

    def exchange(self, call: Call) -> tuple[int | str, float, float]:
        """Status, seconds, and the Retry-After the server asked for (0 if none)."""
        headers = {"content-type": call.media_type} if call.media_type else {}
        started = time.perf_counter()
        retry_after = 0.0
        try:
            self.http.request(call.method, call.path, body=call.body, headers=headers)
            response = self.http.getresponse()
            response.read()
            status: int | str = response.status
            retry_after = float(response.getheader("retry-after") or 0)
        except (OSError, http.client.HTTPException) as error:
            status = type(error).__name__
            self.http.close()
            self.http = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        return status, time.perf_counter() - started, retry_after


def soak(args: argparse.Namespace, inputs: Path) -> dict:
    calls = mixed_calls(inputs)
    population, weights = [c for c, _ in calls], [w for _, w in calls]
    port, server = start_service({"MALLOC_ARENA_MAX": "2"})
    answers: Counter[tuple[str, int | str]] = Counter()
    lock, remaining = threading.Lock(), [args.requests]
    samples = [(0, rss_mb(server.pid))]
    bar = tqdm(total=args.requests, unit="req", desc="soak")

    def client(seed: int) -> None:
        rng, connection = random.Random(seed), Connection(port)
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            call = rng.choices(population, weights)[0]
            status, _ = connection.send(call)
            with lock:
                answers[(call.kind, status)] += 1
                bar.update(1)
                done = bar.n
                if done % 5000 == 0:
                    samples.append((done, rss_mb(server.pid)))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        bar.close()
        samples.append((args.requests, rss_mb(server.pid)))
    finally:
        stop(server)
    warm = samples[1][1] if len(samples) > 2 else samples[0][1]
    return {
        "requests": args.requests,
        "answers": {f"{kind} -> {status}": n for (kind, status), n in sorted(answers.items(), key=str)},
        "rss_mb": samples,
        "growth_mb_after_warmup": samples[-1][1] - warm,
        "growth_mb_over_last_20000": samples[-1][1] - next(m for n, m in samples if n >= args.requests - 20_000),
        "growth_mb_from_ready": samples[-1][1] - samples[0][1],
    }


def overload(args: argparse.Namespace, inputs: Path) -> dict:
    """``args.clients`` clients send 12-megapixel JPEGs to ``args.path`` for ``args.seconds``, each
    giving up after ``args.timeout`` (and reconnecting), as impatient clients do, and waiting as
    long as a 429's Retry-After says unless ``args.ignore_retry_after``; their threads run at nice
    ``args.client_nice`` (19 stands for clients on machines of their own, which take none of the
    server's CPU). /healthz is asked from a process of its own, as a kubelet asks. The service's
    resident memory is sampled throughout, from after one request of the kind has warmed it up
    (building the feature-map sessions, for /featuremaps)."""
    big = Call("12-megapixel JPEG", "POST", args.path, (inputs / "big.jpg").read_bytes(), "image/jpeg")
    port, server = start_service({})
    results: list[tuple[int | str, float]] = []
    ready_rss = rss_mb(server.pid)
    for _ in range(WARMING_CONNECTIONS):
        Connection(port).send(big)
    warm_rss = rss_mb(server.pid)
    memory = [warm_rss]
    stop_at = time.monotonic() + args.seconds

    def client() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), args.client_nice)  # this thread's alone
        connection = Connection(port, timeout=args.timeout)
        while time.monotonic() < stop_at:
            status, seconds, retry_after = connection.exchange(big)
            results.append((status, seconds))
            if status == 429 and not args.ignore_retry_after:
                time.sleep(min(retry_after, max(0.0, stop_at - time.monotonic())))

    try:
        probe = start_probe(port, args.seconds)
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for _ in tqdm(range(int(args.seconds)), desc=f"overload {args.path}, {args.clients} clients", unit="s"):
            time.sleep(1)
            memory.append(rss_mb(server.pid))
        for thread in threads:
            thread.join()
        health = probe_answers(probe)
        time.sleep(2)  # what is still running for clients that gave up
        memory.append(rss_mb(server.pid))
    finally:
        stop(server)
    accepted = np.array([seconds for status, seconds in results if status == 200]) * 1000
    health_ms = np.array([seconds for _, seconds in health]) * 1000
    return {
        "path": args.path,
        "clients": args.clients,
        "client_nice": args.client_nice,
        "seconds": args.seconds,
        "client_timeout_s": args.timeout,
        "answers": dict(Counter(str(status) for status, _ in results)),
        "accepted_per_s": len(accepted) / args.seconds,
        "accepted_p50_ms": float(np.percentile(accepted, 50)) if len(accepted) else None,
        "accepted_p99_ms": float(np.percentile(accepted, 99)) if len(accepted) else None,
        "healthz": dict(Counter(str(status) for status, _ in health)),
        "healthz_p50_ms": float(np.percentile(health_ms, 50)),
        "healthz_p99_ms": float(np.percentile(health_ms, 99)),
        "healthz_max_ms": float(health_ms.max()),
        "honours_retry_after": not args.ignore_retry_after,
        "rss_ready_mb": ready_rss,
        "rss_warm_mb": warm_rss,
        "rss_peak_mb": max(memory),
        "rss_end_mb": memory[-1],
        "rss_growth_mb": max(memory) - warm_rss,
    }


def featurecost(args: argparse.Namespace, inputs: Path) -> dict:
    """What /featuremaps costs the service: memory once every model's feature-map session exists,
    and /classify latency (one client, so no batching) before and after they are built."""
    photo = Call("classify", "POST", "/classify", (inputs / "small.jpg").read_bytes(), "image/jpeg")
    started = time.perf_counter()
    port, server = start_service({})
    figures: dict = {"ready_seconds": time.perf_counter() - started, "ready_rss_mb": rss_mb(server.pid)}
    connection = Connection(port)

    def classify_ms() -> dict:
        for _ in range(20):
            connection.send(photo)
        times = np.array([connection.send(photo)[1] for _ in tqdm(range(args.requests), desc="/classify")]) * 1000
        return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}

    try:
        figures["classify_before"] = classify_ms()
        figures["rss_after_classify_mb"] = rss_mb(server.pid)
        models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=30).read())["models"]
        names = [m["name"] for m in models if m["status"] == "ready"]
        for name in tqdm(names, desc="feature-map sessions"):
            connection.send(Call("featuremaps", "POST", f"/featuremaps?model={name}", photo.body, photo.media_type))
        figures["rss_with_featuremaps_mb"] = rss_mb(server.pid)
        figures["featuremaps_extra_mb"] = figures["rss_with_featuremaps_mb"] - figures["rss_after_classify_mb"]
        figures["classify_after"] = classify_ms()
    finally:
        stop(server)
    return figures


def post_empty(port: int, path: str) -> int:
    """POST with an empty body (the repository API), on a fresh connection: the status."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def cycle_once(port: int, model: str, calls: list[Call]) -> list[int | str]:
    """One unload and load of ``model`` through the repository API, then ``calls`` on it: every
    status, in order."""
    statuses: list[int | str] = [
        post_empty(port, f"/v2/repository/models/{model}/unload"),
        post_empty(port, f"/v2/repository/models/{model}/load"),
    ]
    connection = Connection(port)
    statuses += [connection.send(call)[0] for call in calls]
    connection.http.close()
    return statuses


def cycles(args: argparse.Namespace, inputs: Path) -> dict[str, Any]:
    """``args.cycles`` unloads and loads of ``args.model`` on a server in explicit mode, each load
    followed by a classification (and a feature-map request with ``args.featuremaps``, which
    builds the model's second session): the resident memory when ready, once WARM_CYCLES cycles
    have warmed the allocator up, and at the end. What a retired model keeps alive (sessions held
    by a reference, threads never ended) shows as growth from the warm figure."""
    photo = (inputs / "small.jpg").read_bytes()
    calls = [Call("classify", "POST", f"/classify?model={args.model}", photo, "image/jpeg")]
    if args.featuremaps:
        calls.append(Call("featuremaps", "POST", f"/featuremaps?model={args.model}", photo, "image/jpeg"))
    environment = {
        "MALLOC_ARENA_MAX": "2",  # as the Dockerfile deploys it
        "CNNSERVE_MODEL_CONTROL": "explicit",
        "CNNSERVE_LOAD_MODELS": args.model,
        "CNNSERVE_DEFAULT_MODEL": args.model,
        "CNNSERVE_PROCESSES": str(args.processes),
    }
    port, server = start_service(environment)
    statuses: Counter[str] = Counter()
    samples = [(0, rss_mb(server.pid))]
    try:
        for cycle in tqdm(range(1, args.cycles + 1), desc=f"unload/load {args.model}", unit="cycle"):
            statuses.update(str(status) for status in cycle_once(port, args.model, calls))
            if cycle == min(WARM_CYCLES, args.cycles) or cycle == args.cycles or cycle % 10 == 0:
                samples.append((cycle, rss_mb(server.pid)))
    finally:
        stop(server)
    warm = next(mb for cycle, mb in samples if cycle == min(WARM_CYCLES, args.cycles))
    return {
        "model": args.model,
        "cycles": args.cycles,
        "processes": args.processes,
        "featuremaps": args.featuremaps,
        "statuses": dict(statuses),
        "rss_mb": samples,
        "rss_ready_mb": samples[0][1],
        "rss_warm_mb": warm,
        "rss_end_mb": samples[-1][1],
        "growth_mb_after_warmup": samples[-1][1] - warm,
        "growth_mb_from_ready": samples[-1][1] - samples[0][1],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    runs = parser.add_subparsers(dest="run", required=True)
    soak_args = runs.add_parser("soak", help="mixed requests; resident-memory growth")
    soak_args.add_argument("--requests", type=int, default=50_000)
    soak_args.add_argument("--clients", type=int, default=8)
    overload_args = runs.add_parser("overload", help="many clients with 12-megapixel photos")
    overload_args.add_argument("--clients", type=int, default=64)
    overload_args.add_argument("--seconds", type=float, default=30.0)
    overload_args.add_argument("--path", default="/classify", help="e.g. /featuremaps (default /classify)")
    overload_args.add_argument("--timeout", type=float, default=60.0, help="seconds a client waits for an answer")
    overload_args.add_argument(
        "--ignore-retry-after", action="store_true", help="clients send again at once after a 429, as hostile ones do"
    )
    overload_args.add_argument(
        "--client-nice",
        type=int,
        default=0,
        choices=range(20),
        metavar="0-19",
        help="nice value of the client threads; 19 stands for clients on machines of their own (default 0)",
    )
    cost_args = runs.add_parser("featurecost", help="start-up, memory and /classify latency with feature maps")
    cost_args.add_argument("--requests", type=int, default=300)
    cycle_args = runs.add_parser("cycles", help="unload and load a model many times; resident-memory growth")
    cycle_args.add_argument("--cycles", type=int, default=50)
    cycle_args.add_argument("--model", default="efficientnet_lite0")
    cycle_args.add_argument("--processes", type=int, default=1, help="server processes (each loads the model)")
    cycle_args.add_argument(
        "--featuremaps", action="store_true", help="also a /featuremaps request after each load (its second session)"
    )
    for run in (soak_args, overload_args, cost_args, cycle_args):
        run.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        make_inputs(Path(scratch))
        runs = {"soak": soak, "overload": overload, "featurecost": featurecost, "cycles": cycles}
        figures = runs[args.run](args, Path(scratch))
    text = json.dumps(figures, indent=2)
    print(text)
    if args.run == "soak":
        print(f"resident-memory growth over the last 20,000 requests: {figures['growth_mb_over_last_20000']:+.1f} MB")
    if args.run == "cycles":
        print(
            f"resident memory over {args.cycles} unload/load cycles of {args.model}: {figures['rss_ready_mb']:.0f} MB "
            f"ready, {figures['rss_warm_mb']:.0f} MB after {min(WARM_CYCLES, args.cycles)} cycles, "
            f"{figures['rss_end_mb']:.0f} MB at the end: {figures['growth_mb_after_warmup']:+.1f} MB after warm-up"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
