"""What a refused upload costs the server: clients send big bodies without a credential and send
again at once after each 401; the server's CPU (its processes', from /proc) per refusal, and the
/healthz latency seen meanwhile from a process of its own.

    python -m bench.refusals --clients 8 --processes 1 --bytes 3000000 --seconds 6

Run it on a commit before and after a change, on the same machine, in turn: the figures move with
the machine's other load.
"""

from __future__ import annotations

import argparse
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
from tests.conftest import free_port, wait_ready

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
two processes cold 1 time in 8, and it built its session mid-flood (memory +200 MB instead of
+70). Sixteen leave one cold 1 time in 30,000."""


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--bytes", type=int, default=3_000_000)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
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
