"""Models managed at runtime on real servers (``python -m app serve``), one process and several:
a reload under load loses nothing, and every server process serves the same models after a load,
an unload, a poll, or its own replacement.

Bounded by counts, with generous deadlines that a passing run never reaches; nothing is timed.
The kernel spreads fresh connections over the processes (SO_REUSEPORT, by a hash of the client's
port), so many fresh connections that all answer the same reach every process."""

from __future__ import annotations

import http.client
import io
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from ..conftest import MODELS, live_server, png_bytes
from .test_model_control import copy_model, eventually
from .test_recovery import replacement_of, wait_for_line
from .test_server import server_processes

CLIENTS = 8  # keep-alive connections posting /classify at once
REQUESTS_EACH = 25  # the least each client sends; it goes on until the reloads are done
RELOADS_EACH = 3  # per model, while the clients post
FRESH_CONNECTIONS = 40  # enough that both processes answer some (all on one: odds 2**-39)
DEADLINE_S = 300.0  # for a whole load run; generous on a busy two-core machine
CONNECTION_ERRORS = (OSError, http.client.HTTPException)
READY, UNKNOWN = Counter({200: FRESH_CONNECTIONS}), Counter({404: FRESH_CONNECTIONS})  # /v2/models/NAME/ready


def repository_of(folder: Path, *names: str) -> Path:
    """A scratch repository holding copies of ``names`` from models/."""
    folder.mkdir()
    for name in names:
        shutil.copytree(MODELS / name, folder / name)
    return folder


def post(url: str, path: str) -> int:
    """POST with an empty body on a fresh connection; the status, whatever it is."""
    request = urllib.request.Request(f"{url}{path}", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def fresh_statuses(url: str, path: str, count: int = FRESH_CONNECTIONS) -> Counter[int]:
    """The statuses of ``count`` GETs of ``path``, each on a new connection."""
    statuses: Counter[int] = Counter()
    for _ in range(count):
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=30) as response:
                statuses[response.status] += 1
        except urllib.error.HTTPError as error:
            statuses[error.code] += 1
    return statuses


def readiness(url: str, model: str) -> Counter[int]:
    """How FRESH_CONNECTIONS fresh connections answer whether ``model`` is ready."""
    return fresh_statuses(url, f"/v2/models/{model}/ready")


def everywhere(url: str, model: str, status: int) -> bool:
    """Whether every one of FRESH_CONNECTIONS fresh connections answers ``status`` for ``model``."""
    return readiness(url, model) == {status: FRESH_CONNECTIONS}


# -- a reload under load -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bodies(photos) -> dict[str, tuple[bytes, str]]:
    """A request body per model: a 28x28 PNG for LeNet-5, a small JPEG for EfficientNet-Lite0."""
    photo = Image.open(photos["chelsea"])
    jpeg = io.BytesIO()
    photo.convert("RGB").resize((64, 64)).save(jpeg, "JPEG")
    return {
        "lenet5": (png_bytes(photo.convert("L").resize((28, 28))), "image/png"),
        "efficientnet_lite0": (jpeg.getvalue(), "image/jpeg"),
    }


class Load:
    """CLIENTS clients, half on each model, each on its own keep-alive connection (http.client
    reconnects when a response says ``Connection: close``), posting at least REQUESTS_EACH
    requests and until ``done`` is set; every answer and every connection error is recorded."""

    def __init__(self, port: int, bodies: dict[str, tuple[bytes, str]]) -> None:
        self.port, self.bodies = port, bodies
        self.statuses: Counter[int | str] = Counter()
        self.per_model: Counter[tuple[str, int | str]] = Counter()
        self.lock = threading.Lock()
        self.done = threading.Event()
        models = sorted(bodies)
        self.threads = [threading.Thread(target=self.client, args=(models[i % len(models)],)) for i in range(CLIENTS)]

    def client(self, model: str) -> None:
        body, media_type = self.bodies[model]
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        deadline, sent = time.monotonic() + DEADLINE_S, 0
        while (sent < REQUESTS_EACH or not self.done.is_set()) and time.monotonic() < deadline:
            try:
                connection.request("POST", f"/classify?model={model}", body=body, headers={"content-type": media_type})
                response = connection.getresponse()
                response.read()
                status: int | str = response.status
            except CONNECTION_ERRORS as error:
                status = f"{type(error).__name__}: {error}"
                connection.close()
            with self.lock:
                self.statuses[status] += 1
                self.per_model[(model, status)] += 1
            sent += 1
        connection.close()

    def answered(self) -> int:
        with self.lock:
            return sum(self.statuses.values())


def reload_repeatedly(url: str, repository: Path, load: Load) -> list[tuple[str, int]]:
    """RELOADS_EACH reloads of each model, in turn, once the clients are under way; each one after
    touching the model's file, so that every process really loads a new session (a reload of
    unchanged files keeps the model it has)."""
    deadline = time.monotonic() + DEADLINE_S
    while load.answered() < CLIENTS:
        assert time.monotonic() < deadline, "the clients never got going"
        time.sleep(0.05)
    outcomes = []
    for _ in range(RELOADS_EACH):
        for model in sorted(load.bodies):
            os.utime(repository / model / "model.onnx")
            outcomes.append((model, post(url, f"/v2/repository/models/{model}/load")))
    return outcomes


@pytest.mark.parametrize("processes", ["1", "2"])
def test_reloads_under_load_lose_no_request_and_give_no_error(tmp_path, bodies, processes):
    repository = repository_of(tmp_path / "models", "efficientnet_lite0", "lenet5")
    environment = {
        "CNNSERVE_MODELS_DIR": str(repository),
        "CNNSERVE_MODEL_CONTROL": "explicit",
        "CNNSERVE_LOAD_MODELS": "efficientnet_lite0,lenet5",
        "CNNSERVE_PROCESSES": processes,
    }
    with (tmp_path / "server.log").open("w") as log, live_server(output=log, **environment) as (url, _):
        load = Load(int(url.rsplit(":", 1)[1]), bodies)
        for thread in load.threads:
            thread.start()
        try:
            outcomes = reload_repeatedly(url, repository, load)
        finally:
            load.done.set()
            for thread in load.threads:
                thread.join(timeout=DEADLINE_S)
        loaded = (tmp_path / "server.log").read_text().count("loaded model efficientnet_lite0 on")
    print(f"\n{processes} process(es): {load.answered()} requests {dict(load.per_model)}; reloads {outcomes}")
    assert not any(thread.is_alive() for thread in load.threads)
    assert outcomes == [(m, 200) for _ in range(RELOADS_EACH) for m in sorted(bodies)]
    assert set(load.statuses) == {200}, dict(load.statuses)
    assert load.answered() >= CLIENTS * REQUESTS_EACH
    assert loaded == int(processes) * (1 + RELOADS_EACH)  # each process really reloaded each time


# -- several processes agree ---------------------------------------------------------------------


def two_processes(repository: Path, control: str, **settings: str) -> dict[str, str]:
    """The environment of two server processes on ``repository`` under model control ``control``."""
    return {
        "CNNSERVE_MODELS_DIR": str(repository),
        "CNNSERVE_DEFAULT_MODEL": "lenet5",
        "CNNSERVE_MODEL_CONTROL": control,
        "CNNSERVE_PROCESSES": "2",
        **settings,
    }


@pytest.fixture
def two_explicit(tmp_path):
    """Two server processes in explicit mode, lenet5 and kernels loaded at start, and a model
    folder ``extra`` in the repository that is not; the server's log in a file."""
    repository = repository_of(tmp_path / "models", "lenet5", "kernels")
    copy_model("lenet5", repository, "extra")
    environment = two_processes(repository, "explicit", CNNSERVE_LOAD_MODELS="lenet5,kernels")
    log = tmp_path / "server.log"
    with log.open("w") as output, live_server(output=output, **environment) as (url, server):
        yield url, server, log


def test_every_process_stops_serving_an_unloaded_model_and_serves_a_loaded_one(two_explicit):
    url, _, _ = two_explicit
    assert readiness(url, "kernels") == READY
    assert readiness(url, "extra") == UNKNOWN
    assert post(url, "/v2/repository/models/kernels/unload") == 200
    assert readiness(url, "kernels") == UNKNOWN
    assert post(url, "/v2/repository/models/extra/load") == 200
    assert readiness(url, "extra") == READY
    assert post(url, "/v2/repository/models/kernels/load") == 200
    assert readiness(url, "kernels") == READY
    assert readiness(url, "lenet5") == READY


def test_a_replacement_process_serves_what_the_others_serve_not_the_start_up_set(two_explicit):
    url, server, log = two_explicit
    assert post(url, "/v2/repository/models/kernels/unload") == 200
    assert post(url, "/v2/repository/models/extra/load") == 200
    before = server_processes(server.pid)
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + DEADLINE_S
    replacement = replacement_of(server.pid, before, deadline)
    wait_for_line(log, f"cnnserve[{replacement}]: ", "model(s) loaded", deadline=deadline)
    assert readiness(url, "extra") == READY
    assert readiness(url, "kernels") == UNKNOWN
    assert readiness(url, "lenet5") == READY
    # and it follows the next change, as the process it replaced did
    assert post(url, "/v2/repository/models/extra/unload") == 200
    assert readiness(url, "extra") == UNKNOWN


def test_in_poll_mode_every_process_serves_a_model_folder_copied_in(tmp_path):
    repository = repository_of(tmp_path / "models", "lenet5", "kernels")
    environment = two_processes(repository, "poll", CNNSERVE_POLL_INTERVAL_S="0.2")
    with live_server(**environment) as (url, _):
        copy_model("lenet5", repository, "extra")
        eventually(lambda: everywhere(url, "extra", 200), "the copied model being served by every process")
        shutil.rmtree(repository / "kernels")
        eventually(lambda: everywhere(url, "kernels", 404), "the removed model being unloaded by every process")


def test_in_poll_mode_every_process_follows_the_api_too_a_replacement_included(tmp_path):
    """An unload through the API holds in every process while the folder is unchanged: at each
    poll, and in a process that starts later; a load through the API reaches every process."""
    repository = repository_of(tmp_path / "models", "lenet5", "kernels")
    environment = two_processes(repository, "poll", CNNSERVE_POLL_INTERVAL_S="0.2")
    log = tmp_path / "server.log"
    with log.open("w") as output, live_server(output=output, **environment) as (url, server):
        assert post(url, "/v2/repository/models/kernels/unload") == 200
        assert readiness(url, "kernels") == UNKNOWN
        before = server_processes(server.pid)
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + DEADLINE_S
        replacement = replacement_of(server.pid, before, deadline)
        wait_for_line(log, f"cnnserve[{replacement}]: ", "model(s) loaded", deadline=deadline)
        assert readiness(url, "kernels") == UNKNOWN  # polls went on meanwhile: the folder is unchanged
        assert post(url, "/v2/repository/models/kernels/load") == 200
        assert readiness(url, "kernels") == READY
