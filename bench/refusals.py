"""What a refused upload costs the server: clients send big bodies without a credential and send
again at once after each 401; the server's CPU (its processes', from /proc) per refusal, and the
/healthz latency seen meanwhile from a process of its own.

    python -m bench.refusals --clients 8 --processes 1 --bytes 3000000 --seconds 6
    python -m bench.refusals --in-process /featuremaps   # the app's CPU per refusal for capacity

Run it on a commit before and after a change, on the same machine, in turn: the figures move with
the machine's other load.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench.run import ROOT
from tests.conftest import asgi_post, free_port, wait_ready

PROBE = """
import http.client, json, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
answers, stop = [], time.monotonic() + seconds
while time.monotonic() < stop:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        status = response.status
    except OSError as error:
        status = type(error).__name__
    finally:
        connection.close()
    answers.append((status, time.perf_counter() - started))
    time.sleep(0.05)
print(json.dumps(answers))
"""

WARMING_CONNECTIONS = 16
"""Fresh connections that warm a server's processes before a measurement (a feature map's first
request in a process builds its session: some 140 MB). The kernel hands each fresh connection to
a process by a hash of its address (SO_REUSEPORT), so a few can all land on one: four left one of
two processes cold 1 time in 8, and it built its session mid-flood (memory +200 to +220 MB instead
of +55 to +80: over the suite's bound). Sixteen leave one cold 1 time in 30,000."""


def start_probe(port: int, seconds: float) -> subprocess.Popen[str]:
    """/healthz every 50 ms for ``seconds``, each on a fresh connection, from a process of its own, as
    a kubelet probes: a probe among the load generator's threads waits for their interpreter lock,
    and measures the client as much as the server (README "Access control")."""
    return subprocess.Popen([sys.executable, "-c", PROBE, str(port), str(seconds)], stdout=subprocess.PIPE, text=True)


def probe_answers(probe: subprocess.Popen[str]) -> list[tuple[int | str, float]]:
    """What the probe saw: (status, seconds) for each /healthz it asked."""
    return [(status, seconds) for status, seconds in json.loads(probe.communicate()[0])]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(int(child)) for child in children)


def refused(port: int, body: bytes) -> int | str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/classify", body=body, headers={"content-type": "image/jpeg"})
        response = connection.getresponse()
        response.read()
        return response.status
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    finally:
        connection.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def app_cost(path: str, count: int) -> tuple[Counter[int], float]:
    """The app's own CPU for one request to ``path`` while its model (LeNet-5) is held full, called
    in-process as uvicorn calls it under ``cnnserve serve`` (no sockets, the body never asked for):
    what a refusal for capacity costs the event loop above the server's protocol."""
    from app.config import Settings
    from app.http.app import create_app
    from app.process.connection import LINGER_EXTENSION

    app = create_app(Settings(default_model="lenet5", load_models="lenet5", model_control="explicit"))
    statuses: Counter[int] = Counter()
    scope = {**asgi_post(path, [(b"content-length", b"12000000")]), "extensions": {LINGER_EXTENSION: {}}}

    async def receive() -> dict[str, object]:
        raise AssertionError("a refused request's body is never asked for")

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] += 1  # type: ignore[index]

    async with app.router.lifespan_context(app):
        while not app.state.services.repository.loaded:
            await asyncio.sleep(0.05)
        batcher = app.state.services.repository.get("lenet5").batcher
        with batcher.admission(cost=batcher.capacity):
            for _ in range(count // 10):  # warm-up, not counted
                await app(dict(scope), receive, send)
            statuses.clear()
            started = time.process_time()
            for _ in range(count):
                await app(dict(scope), receive, send)
            used = time.process_time() - started
    return statuses, used / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="clients sending at once (default 8)")
    parser.add_argument("--processes", type=int, default=1, help="server processes (default 1)")
    parser.add_argument("--bytes", type=int, default=3_000_000, help="size of each upload (default 3 MB)")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long the clients send (default 6)")
    parser.add_argument(
        "--in-process",
        metavar="PATH",
        help="instead: the app's CPU per refusal for capacity at PATH (e.g. /featuremaps), in-process",
    )
    args = parser.parse_args()
    if args.in_process:
        statuses, seconds = asyncio.run(app_cost(args.in_process, 5000))
        print(f"{dict(statuses)}: {seconds * 1e6:.0f} us of CPU a refusal for capacity at {args.in_process}")
        return
    port = free_port()
    environment = {
        **os.environ,
        "CNNSERVE_PORT": str(port),
        "CNNSERVE_GRPC_PORT": "0",
        "CNNSERVE_PROCESSES": str(args.processes),
        "CNNSERVE_API_KEY": os.urandom(16).hex(),
        "CNNSERVE_DEFAULT_MODEL": "lenet5",
    }
    server = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT, env=environment)
    body, statuses = os.urandom(args.bytes), Counter[int | str]()
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        probe = start_probe(port, args.seconds)
        stop_at, before = time.monotonic() + args.seconds, cpu_seconds(server.pid)

        def client() -> None:
            while time.monotonic() < stop_at:
                statuses[refused(port, body)] += 1

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        used = cpu_seconds(server.pid) - before
        latencies = [seconds for _, seconds in probe_answers(probe)]
    finally:
        server.terminate()
        server.wait(60)
    count = sum(statuses.values())
    print(
        f"{dict(statuses)} in {args.seconds:g} s; server CPU {used:.2f} s = {used / count * 1000:.2f} ms a refusal; "
        f"/healthz p50 {percentile(latencies, 0.5) * 1000:.1f} ms, p99 {percentile(latencies, 0.99) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
