"""gRPC against HTTP, and the cost of traces, on a real `cnnserve serve` on loopback.

``protocols``: one preprocessed 224x224 tensor per request, over the Open Inference Protocol's gRPC
(tritonclient.grpc, raw_input_contents) and over its HTTP binary-data extension
(tritonclient.http), from 1 and 8 client processes at once (each a connection of its own, as
separate clients are), each protocol in turn on the same server. Both clients are NVIDIA's own, so
the client's own cost is alike; what differs is the wire and the server's path.

``tracing``: LeNet-5 /classify under wrk, traces off against traces on (exported over OTLP to a
collector that only counts them, started here), in alternating runs; with ``--baseline DIR``, a
copy of the tree before traces and request ids (``git archive``) is measured too, traces off being
the default that must cost nothing.

``cpu``: the same three, in process: the CPU time of one LeNet-5 /classify through the whole ASGI
app (no socket, no uvicorn), over thousands of requests one after another, each variant in a
process of its own, in turn, the least of each kept. CPU time, not wall time: the other work of a
shared machine hardly moves it, where it moves wrk's figures by half.

    python -m bench.grpc_vs_http protocols --seconds 8 --clients 1,8
    python -m bench.grpc_vs_http tracing --seconds 6 --rounds 3 --baseline /tmp/base
    python -m bench.grpc_vs_http cpu --requests 4000 --rounds 5 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import ROOT, free_port, make_inputs, start, start_service, stop, wrk

MODELS = {"efficientnet_lite0": (3, 224, 224), "kernels": (1, 224, 224)}
WARM_CALLS = 5


def client_run(protocol: str, address: str, model: str, seconds: float, ready: Any, results: Any) -> None:
    """One client: its own connection, warmed, then (once every client is warm) calls back to back
    for ``seconds``; the latency of each, in seconds, goes to ``results``."""
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    batch = np.random.default_rng(0).standard_normal((1, *MODELS[model]), dtype=np.float32)
    triton = triton_grpc if protocol == "grpc" else triton_http
    client = triton.InferenceServerClient(address)
    given = triton.InferInput("input", list(batch.shape), "FP32")
    if protocol == "grpc":
        given.set_data_from_numpy(batch)
        wanted = [triton_grpc.InferRequestedOutput("logits")]
    else:
        given.set_data_from_numpy(batch, binary_data=True)
        wanted = [triton_http.InferRequestedOutput("logits", binary_data=True)]
    for _ in range(WARM_CALLS):
        client.infer(model, [given], outputs=wanted)
    ready.wait()
    latencies, until = [], time.perf_counter() + seconds
    while (started := time.perf_counter()) < until:
        client.infer(model, [given], outputs=wanted)
        latencies.append(time.perf_counter() - started)
    client.close()
    results.put(latencies)


def load(protocol: str, address: str, model: str, clients: int, seconds: float) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    ready, results = context.Barrier(clients + 1), context.Queue()  # the clock starts once all are warm
    processes = [
        context.Process(target=client_run, args=(protocol, address, model, seconds, ready, results))
        for _ in range(clients)
    ]
    for process in processes:
        process.start()
    ready.wait(timeout=300)
    latencies = sorted(t for _ in processes for t in results.get(timeout=seconds + 120))
    for process in processes:
        process.join()
    return {
        "protocol": protocol,
        "model": model,
        "clients": clients,
        "rps": len(latencies) / seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
    }


def protocols(args: argparse.Namespace) -> list[dict[str, Any]]:
    grpc_port = free_port()
    port, server = start_service({"CNNSERVE_GRPC_PORT": str(grpc_port)})
    results = []
    try:
        for model in args.models.split(","):
            for clients in (int(c) for c in args.clients.split(",")):
                for round_ in range(args.rounds):  # the protocols in turn, so that both meet the same weather
                    for protocol, address in (("grpc", f"127.0.0.1:{grpc_port}"), ("http", f"127.0.0.1:{port}")):
                        time.sleep(1.0)
                        results.append({**load(protocol, address, model, clients, args.seconds), "round": round_})
                        print(row(results[-1]), flush=True)
    finally:
        stop(server)
    print("best of each (the machine's other load only ever slows a run down):")
    for key in sorted({(r["model"], r["clients"], r["protocol"]) for r in results}):
        runs = [r for r in results if (r["model"], r["clients"], r["protocol"]) == key]
        print(row(max(runs, key=lambda r: r["rps"])))
    return results


def row(result: dict[str, Any]) -> str:
    about = " ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, float))
    return f"{about}: {result['rps']:8.1f} req/s  p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms"


def collector() -> tuple[Any, int, list[int]]:
    """An OTLP trace collector on loopback that counts the spans it is sent, and nothing else."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    spans = [0]

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            spans[0] += sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, spans


def start_tree(tree: Path, env: dict[str, str]) -> tuple[int, subprocess.Popen[bytes]]:
    """``python -m app serve`` from the source tree ``tree`` (this one, or a baseline copy), ready."""
    port = free_port()
    command = [sys.executable, "-m", "app", "serve", "--port", str(port)]
    quiet = {"CNNSERVE_LOG_LEVEL": "warning", "CNNSERVE_GRPC_PORT": "0", **env}
    return port, start(command, quiet, f"http://127.0.0.1:{port}/readyz", cwd=tree)


def tracing(args: argparse.Namespace) -> list[dict[str, Any]]:
    sink, sink_port, spans = collector()
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    variants = {"traces off": ({}, ROOT), "traces on": (on, ROOT)}
    if args.baseline:
        variants["before (no traces, no request ids)"] = ({}, Path(args.baseline))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        inputs = Path(scratch)
        make_inputs(inputs)
        for round_ in range(args.rounds):
            for name, (env, tree) in variants.items():
                port, server = start_tree(tree, env)
                url = f"http://127.0.0.1:{port}/classify?model=lenet5"
                try:
                    wrk(url, inputs / "lenet.png", "image/png", 2, 1.0)
                    time.sleep(1.0)
                    run = wrk(url, inputs / "lenet.png", "image/png", args.connections, args.seconds)
                finally:
                    stop(server)
                result = {"variant": name, "round": round_, "rps": run["rps"], "p50_ms": run["p50_us"] / 1000}
                result["p99_ms"] = run["p99_us"] / 1000
                results.append(result)
                print(row(result), flush=True)
    sink.stop(None)
    for name in variants:
        rates = [r["rps"] for r in results if r["variant"] == name]
        every = sorted(round(r) for r in rates)
        print(f"{name}: median {statistics.median(rates):.0f} req/s over {len(rates)} runs {every}")
    print(f"spans received by the collector: {spans[0]}")
    return results


IN_PROCESS = """
import asyncio, json, sys, time
from pathlib import Path
from app.config import Settings
from app.http.app import create_app
from app.serving import services as wiring

models, png, requests = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes(), int(sys.argv[3])
services = wiring.build(Settings(models_dir=models, default_model="lenet5", log_level="warning"))
services.control.load_initial()
app = create_app(services=services)
headers = [(b"host", b"bench"), (b"content-type", b"image/png"), (b"content-length", str(len(png)).encode())]
scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
         "path": "/classify", "raw_path": b"/classify", "query_string": b"model=lenet5", "root_path": "",
         "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

async def one():
    messages, status = [{"type": "http.request", "body": png, "more_body": False}], []
    async def receive():
        return messages.pop() if messages else await asyncio.Event().wait()
    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
    await app(dict(scope), receive, send)
    assert status == [200], status

async def main():
    for _ in range(200):
        await one()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        await one()
    return (time.process_time() - cpu) / requests, (time.perf_counter() - wall) / requests

cpu, wall = asyncio.run(main())
print(json.dumps({"cpu_us": cpu * 1e6, "wall_us": wall * 1e6}))
"""


def cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    sink, sink_port, spans = collector()
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    sampled = {**on, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    variants = {"traces off": ({}, ROOT), "traces on": (on, ROOT), "traces on, 1 in 10 sampled": (sampled, ROOT)}
    if args.baseline:
        variants["before (no traces, no request ids)"] = ({}, Path(args.baseline))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        make_inputs(Path(scratch))
        png = Path(scratch) / "lenet.png"
        for round_ in range(args.rounds):
            for name, (env, tree) in variants.items():
                command = [sys.executable, "-c", IN_PROCESS, str(ROOT / "models"), str(png), str(args.requests)]
                done = subprocess.run(
                    command, cwd=tree, env={**os.environ, **env}, capture_output=True, text=True, check=True
                )
                result = {"variant": name, "round": round_, **json.loads(done.stdout.strip().splitlines()[-1])}
                results.append(result)
                print(f"{name} (round {round_}): {result['cpu_us']:.0f} us of CPU a request", flush=True)
    sink.stop(None)
    for name in variants:
        least = min(r["cpu_us"] for r in results if r["variant"] == name)
        print(f"{name}: least {least:.0f} us of CPU a request over {args.rounds} runs")
    print(f"spans received by the collector: {spans[0]}")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    compared = commands.add_parser("protocols", help="gRPC against HTTP binary V2, one 224x224 tensor a request")
    compared.add_argument("--seconds", type=float, default=8.0)
    compared.add_argument("--clients", default="1,8", help="client processes at once, comma-separated")
    compared.add_argument("--models", default="efficientnet_lite0,kernels", help=f"of {sorted(MODELS)}")
    compared.add_argument("--rounds", type=int, default=3, help="runs of each protocol, in turn; the best is kept")
    traced = commands.add_parser("tracing", help="LeNet-5 /classify with traces off and on")
    traced.add_argument("--seconds", type=float, default=6.0)
    traced.add_argument("--rounds", type=int, default=3)
    traced.add_argument("--connections", type=int, default=8)
    traced.add_argument("--baseline", help="a copy of the tree to compare with (git archive of an older commit)")
    measured = commands.add_parser("cpu", help="LeNet-5 /classify in process: CPU time a request, traces off and on")
    measured.add_argument("--requests", type=int, default=4000)
    measured.add_argument("--rounds", type=int, default=5)
    measured.add_argument("--baseline", help="a copy of the tree to compare with (git archive of an older commit)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = {"protocols": protocols, "tracing": tracing, "cpu": cpu}[args.command](args)
    if args.out:
        args.out.write_text(json.dumps({"command": args.command, "results": results}, indent=2))


if __name__ == "__main__":
    main()
