"""Models managed at runtime, in one process (app/serving/control.py): poll mode follows the
repository folder, explicit mode follows load and unload calls, and neither leaves retired models
(their threads, their memory) behind. The lifespan of ``running_client`` runs the watcher, as a
server does; waits are bounded by generous deadlines and never asserted as timings."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.serving.loader import Model

from ..conftest import MODELS, png_bytes, running_client

DEADLINE_S = 30.0  # the longest a change may take to be seen; a poll interval is 0.2 s


def eventually(check: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    """Until ``check()`` holds; fails saying ``what`` never happened within the deadline."""
    deadline = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {deadline_s} s"
        time.sleep(0.05)


def copy_model(source: str, folder: Path, name: str) -> None:
    """Model ``source`` from models/ under the name ``name`` in ``folder`` (model.json renamed),
    prepared beside the repository and moved in at once, as a deployment tool would."""
    staging = folder.parent / f"{folder.name}-staging" / name
    shutil.copytree(MODELS / source, staging)
    spec = json.loads((staging / "model.json").read_text())
    (staging / "model.json").write_text(json.dumps({**spec, "name": name}))
    staging.rename(folder / name)


def replace_files(folder: Path, source: str) -> None:
    """Model ``source``'s model.onnx and model.json in ``folder``, under that folder's name, each
    file written in place (a poll may see the one without the other, and must refuse that)."""
    spec = json.loads((MODELS / source / "model.json").read_text())
    shutil.copyfile(MODELS / source / "model.onnx", folder / "model.onnx")
    (folder / "model.json").write_text(json.dumps({**spec, "name": folder.name}))


@pytest.fixture(scope="module")
def shirt(photos) -> bytes:
    return png_bytes(Image.open(photos["chelsea"]).convert("L").resize((28, 28)))


def scores(client: TestClient, model: str, image: bytes) -> list[tuple[str, float]]:
    response = client.post(f"/classify?model={model}&top_k=10", content=image, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    return [(p["label"], p["score"]) for p in response.json()["predictions"]]


def status_of(client: TestClient, model: str) -> str | None:
    """ready, failed, or None when /models does not list it."""
    listed = {m["name"]: m["status"] for m in client.get("/models").json()["models"]}
    return listed.get(model)


@pytest.fixture
def polled(repo_copy) -> Iterator[TestClient]:
    settings = Settings(models_dir=repo_copy, default_model="lenet5", model_control="poll", poll_interval_s=0.2)
    with running_client(settings) as client:
        yield client


def test_poll_mode_serves_a_model_folder_copied_in(polled, repo_copy, shirt):
    copy_model("lenet5", repo_copy, "lenet5_copy")
    eventually(lambda: status_of(polled, "lenet5_copy") == "ready", "the copied model being served")
    assert scores(polled, "lenet5_copy", shirt) == scores(polled, "lenet5", shirt)
    assert polled.get("/v2/models/lenet5_copy/ready").status_code == 200


def test_poll_mode_unloads_a_model_whose_folder_went(polled, repo_copy):
    assert polled.get("/models/kernels").status_code == 200
    shutil.rmtree(repo_copy / "kernels")
    eventually(lambda: polled.get("/models/kernels").status_code == 404, "the removed model being unloaded")
    assert polled.get("/v2/models/kernels/ready").status_code == 404
    assert status_of(polled, "lenet5") == "ready"


def test_poll_mode_reloads_a_model_whose_files_changed(polled, repo_copy, shirt):
    before = scores(polled, "lenet5", shirt)
    replace_files(repo_copy / "lenet5", "googlenet")
    googlenet = json.loads((MODELS / "googlenet" / "model.json").read_text())["description"]
    eventually(lambda: polled.get("/models/lenet5").json().get("description") == googlenet, "the reload")
    assert scores(polled, "lenet5", shirt) != before
    assert polled.get("/models/lenet5").json()["status"] == "ready"


def test_poll_mode_refuses_a_broken_change_and_the_old_version_keeps_answering(polled, repo_copy, shirt):
    before = scores(polled, "lenet5", shirt)
    (repo_copy / "lenet5" / "model.onnx").write_bytes(b"not an onnx model")

    def refused() -> bool:
        versions = polled.get("/models/lenet5").json()["versions"]
        return versions[0]["status"] == "ready" and "sha256" in (versions[0].get("reason") or "")

    eventually(refused, "the broken change being refused with its reason")
    assert polled.get("/models/lenet5").json()["status"] == "ready"
    assert scores(polled, "lenet5", shirt) == before
    time.sleep(0.6)  # a few more polls of the broken files: the old version still answers
    assert scores(polled, "lenet5", shirt) == before


def test_poll_mode_serves_a_refused_folder_once_it_is_fixed(polled, repo_copy, shirt):
    """A model whose folder went and came back broken is refused, then served once it is fixed."""
    copy_model("lenet5", repo_copy, "later")
    eventually(lambda: status_of(polled, "later") == "ready", "the copied model being served")
    shutil.rmtree(repo_copy / "later")
    eventually(lambda: status_of(polled, "later") is None, "the removed model being unloaded")
    copy_model("kernels", repo_copy, "later")  # the staging folder is free again
    (repo_copy / "later" / "model.onnx").write_bytes(b"broken")
    eventually(lambda: status_of(polled, "later") == "failed", "the broken folder being refused")
    shutil.copyfile(MODELS / "lenet5" / "model.onnx", repo_copy / "later" / "model.onnx")
    spec = json.loads((MODELS / "lenet5" / "model.json").read_text())
    (repo_copy / "later" / "model.json").write_text(json.dumps({**spec, "name": "later"}))
    eventually(lambda: status_of(polled, "later") == "ready", "the fixed folder being served")
    assert scores(polled, "later", shirt) == scores(polled, "lenet5", shirt)


# -- memory: what a retired model leaves ---------------------------------------------------------

CYCLES = 6  # unload/load cycles of EfficientNet-Lite0 in the bounded memory test
WARM_CYCLES = 2  # before the figures later cycles must not grow
GROWTH_BOUND_MB = 100.0  # generous: a leaked EfficientNet-Lite0 costs tens of MB per cycle
EFFICIENTNET = "efficientnet_lite0"


def resident_mb() -> float:
    """This process's resident memory (the test's, which holds the app)."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:"))


def native_threads() -> int:
    """This process's threads that Python did not start: ONNX Runtime's thread pools, for one."""
    return len(list(Path("/proc/self/task").iterdir())) - len(threading.enumerate())


@pytest.fixture
def explicit() -> Iterator[TestClient]:
    settings = Settings(models_dir=MODELS, model_control="explicit", load_models=f"{EFFICIENTNET},lenet5")
    with running_client(settings) as client:
        yield client


def cycle(client: TestClient, photo: bytes, threads: list[threading.Thread]) -> weakref.ref[Model]:
    """Unloads and loads EfficientNet-Lite0 through the repository API and classifies a photo on
    the new copy; returns a weak reference to the copy unloaded, and adds its batcher's threads
    to ``threads`` (the process holds other apps' copies too: only these must end)."""
    current = client.app.state.services.repository.models[EFFICIENTNET]
    threads += current.batcher.threads
    retired = weakref.ref(current)
    del current
    assert client.post(f"/v2/repository/models/{EFFICIENTNET}/unload").status_code == 200
    assert client.post(f"/v2/repository/models/{EFFICIENTNET}/load").status_code == 200
    response = client.post(f"/classify?model={EFFICIENTNET}", content=photo, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    return retired


def test_load_unload_cycles_leave_no_model_behind(explicit, photos):
    """The retired copies are freed (no reference keeps a session alive), their batcher threads
    and ONNX Runtime's threads have ended, and resident memory stays within a generous bound."""
    photo, threads = photos["chelsea"].read_bytes(), []
    retired = [cycle(explicit, photo, threads) for _ in range(WARM_CYCLES)]
    warm_mb, warm_native = resident_mb(), native_threads()
    retired += [cycle(explicit, photo, threads) for _ in range(CYCLES - WARM_CYCLES)]
    gc.collect()
    assert [ref for ref in retired if ref() is not None] == []
    assert threads and not any(thread.is_alive() for thread in threads)
    assert native_threads() <= warm_native
    assert resident_mb() - warm_mb < GROWTH_BOUND_MB
