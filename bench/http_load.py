"""A closed-loop HTTP load generator in Python processes: N keep-alive connections, each posting one
request after another, spread over as many processes as there are cores (or connections), so that
one interpreter's GIL does not cap the rate. Used by bench/gpu.py, whose GPU host may lack wrk and
its libluajit; a Python client costs more CPU per request than wrk (it shares the host's cores with
the server, which the figures then include), but needs nothing the project does not install.

Every request counts where it completes inside the measured window (after a warm-up); latencies are
per request; answers other than 200 are counted as errors, by status.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.sizing import available_cpus

WARM_UP_SECONDS = 0.5


@dataclass(frozen=True)
class Request:
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass
class Tally:
    latencies: list[float]
    errors: Counter[str]


def one_connection(port: int, request: Request, start: float, end: float, tally: Tally, lock: threading.Lock) -> None:
    """Posts until ``end``; keeps what completed between ``start`` and ``end`` (a request slower than
    the window still counts where it ends). A broken connection is reopened."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    mine: list[float] = []
    errors: Counter[str] = Counter()
    while (sent := time.monotonic()) < end:
        try:
            connection.request("POST", request.path, body=request.body, headers=request.headers)
            response = connection.getresponse()
            response.read()
            status = str(response.status)
        except (ConnectionError, http.client.HTTPException, TimeoutError) as error:
            connection.close()
            status = type(error).__name__
        done = time.monotonic()
        if start <= done <= end:
            if status == "200":
                mine.append(done - sent)
            else:
                errors[status] += 1
    connection.close()
    with lock:
        tally.latencies.extend(mine)
        tally.errors.update(errors)


def one_process(port: int, request: Request, connections: int, start: float, end: float) -> Tally:
    tally, lock = Tally([], Counter()), threading.Lock()
    threads = [
        threading.Thread(target=one_connection, args=(port, request, start, end, tally, lock))
        for _ in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def run(port: int, request: Request, connections: int, seconds: float) -> dict[str, Any]:
    """``connections`` clients for ``seconds`` (after a warm-up): requests/s, p50/p99 in ms, errors."""
    processes = max(1, min(connections, available_cpus()))
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    start = time.monotonic() + 1.0 + WARM_UP_SECONDS  # the pool's processes start within the first second
    end = start + seconds
    with ProcessPoolExecutor(processes) as pool:
        tallies = list(pool.map(one_process, *zip(*[(port, request, n, start, end) for n in shares], strict=True)))
    latencies = np.array([t for tally in tallies for t in tally.latencies]) * 1000
    errors: Counter[str] = sum((tally.errors for tally in tallies), Counter())
    if not len(latencies):
        return {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "errors": dict(errors), "requests": 0}
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "errors": dict(errors),
        "requests": len(latencies),
    }
