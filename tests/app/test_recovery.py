"""A server process killed under load: its replacement takes connections only once its models are
loaded, so the clients lose only the requests the killed process held (and get them answered on
retry), never a 503."""

import http.client
import io
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.http.app import create_app
from app.process.topology import NOT_SERVING, ConnectionShare

from ..conftest import live_server
from .test_server import server_processes

THREADS = 4
BEFORE = 200  # requests answered before the kill
AFTER = 400  # requests answered after the replacement logged its models loaded
DEADLINE_S = 180.0  # a generous bound on the whole run, never reached when it passes
CONNECTION_ERRORS = (ConnectionError, http.client.HTTPException)  # reset, refused, cut-off response


@pytest.fixture(scope="module")
def small_jpeg(photos) -> bytes:
    buffer = io.BytesIO()
    Image.open(photos["chelsea"]).convert("RGB").resize((64, 64)).save(buffer, "JPEG")
    return buffer.getvalue()


class Load:
    """THREADS clients, each on its own keep-alive connection, posting until stopped. A request
    that fails on the connection (what the killed process's requests see) is retried once, on a
    new connection; what each request finally got is recorded."""

    def __init__(self, port: int, body: bytes) -> None:
        self.port, self.body = port, body
        self.statuses: Counter[int | str] = Counter()
        self.retried = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client) for _ in range(THREADS)]

    def answered(self) -> int:
        with self.lock:
            return sum(self.statuses.values())

    def record(self, status: int | str, retried: bool) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.retried += retried

    def post(self, connection: http.client.HTTPConnection) -> int:
        connection.request("POST", "/classify?model=lenet5", body=self.body, headers={"content-type": "image/jpeg"})
        response = connection.getresponse()
        response.read()
        return response.status

    def client(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stop.is_set():
            try:
                self.record(self.post(connection), retried=False)
                continue
            except CONNECTION_ERRORS:
                connection.close()
            try:
                self.record(self.post(connection), retried=True)  # http.client reconnects
            except CONNECTION_ERRORS as error:
                self.record(f"failed after a retry: {error!r}", retried=True)
                connection.close()
            except TimeoutError:
                self.record("timed out", retried=True)
                connection.close()
        connection.close()

    def wait_for(self, count: int, deadline: float) -> None:
        while self.answered() < count:
            assert time.monotonic() < deadline, f"only {self.answered()} of {count} requests answered: {self.summary()}"
            assert all(thread.is_alive() for thread in self.threads), f"a client stopped: {self.summary()}"
            time.sleep(0.05)

    def summary(self) -> str:
        with self.lock:
            return f"{dict(self.statuses)}, {self.retried} retried"


def wait_for_line(log: Path, *parts: str, deadline: float) -> None:
    """Until the server's log has a line holding every one of ``parts``."""
    while not any(all(part in line for part in parts) for line in log.read_text().splitlines()):
        assert time.monotonic() < deadline, f"the server never logged a line with {parts}"
        time.sleep(0.05)


def replacement_of(supervisor: int, before: list[int], deadline: float) -> int:
    """The server process the supervisor started after ``before`` were its server processes."""
    while not (started := [pid for pid in server_processes(supervisor) if pid not in before]):
        assert time.monotonic() < deadline, "no replacement process was started"
        time.sleep(0.05)
    return started[0]


def test_a_process_killed_under_load_costs_only_its_own_requests_and_never_a_503(tmp_path, small_jpeg):
    """Bounded by request counts, not by time: BEFORE answered, the kill, the replacement's models
    loaded, AFTER more answered. A replacement that served while it loaded answered dozens to
    thousands of these with 503."""
    log, metrics = tmp_path / "server.log", tmp_path / "metrics"
    metrics.mkdir()
    with (
        log.open("w") as output,
        live_server(output=output, CNNSERVE_PROCESSES="2", PROMETHEUS_MULTIPROC_DIR=str(metrics)) as (url, server),
    ):
        deadline = time.monotonic() + DEADLINE_S
        load = Load(int(url.rsplit(":", 1)[1]), small_jpeg)
        for thread in load.threads:
            thread.start()
        try:
            load.wait_for(BEFORE, deadline)
            before = server_processes(server.pid)
            assert len(before) == 2
            os.kill(before[0], signal.SIGKILL)
            replacement = replacement_of(server.pid, before, deadline)
            wait_for_line(log, f"cnnserve[{replacement}]: ", "model(s) loaded", deadline=deadline)
            load.wait_for(load.answered() + AFTER, deadline)
        finally:
            load.stop.set()
            for thread in load.threads:
                thread.join(timeout=90)
    print(f"\n{sum(load.statuses.values())} requests: {load.summary()}")
    assert load.statuses[503] == 0, load.summary()
    assert not [status for status in load.statuses if not isinstance(status, int) or status >= 500], load.summary()
    assert set(load.statuses) == {200}, load.summary()
    assert (metrics / f"counter_{replacement}.db").exists(), "the replacement never answered a request"


def test_an_app_that_loads_first_has_its_models_when_it_starts_serving(repo_copy):
    app = create_app(Settings(models_dir=repo_copy, default_model="lenet5"), load_first=True)
    with TestClient(app) as client:  # the lifespan has started: uvicorn would accept from now on
        assert app.state.services.repository.loaded
        assert client.get("/readyz").status_code == 200


def test_a_replacement_not_serving_yet_counts_in_no_share():
    """Its siblings keep their clients rather than send them to a backlog nobody accepts from."""
    counts = multiprocessing.RawArray("i", [0, NOT_SERVING])
    share = ConnectionShare(counts, 0, connections={object() for _ in range(4)})
    assert not share.crowded()  # all 4 connections are on the one process that accepts
    counts[1] = 0  # the replacement accepts, and publishes its count
    share.next_check = 0
    assert share.crowded()
