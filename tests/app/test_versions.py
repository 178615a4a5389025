"""Versions, per-model serving settings and refusals in the model repository: Triton's numbered
version folders and their version policy, model.json's serving settings over the global ones, a
broken new version refused with its reason while the old one serves on, a reload that swaps the
model under a request in flight, and names and links that would lead out of the repository.

Every version here is LeNet-5 with its last bias raised for one class, so that any image is
classified as that class and an answer says which version gave it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import numpy_helper
from PIL import Image

from app.config import Settings
from app.serving import services as wiring
from app.serving.errors import BadRequest, NotFound, Overloaded
from app.serving.loader import Model
from app.serving.schemas import VersionStatus
from app.serving.services import Services
from app.serving.spec import json_schema

from ..conftest import MODELS, png_bytes, running_client, spec_of

LENET = MODELS / "lenet5"
LABELS: list[str] = spec_of(LENET)["labels"]
TROUSER, SANDAL, BAG = 1, 5, 8
IMAGE = png_bytes(Image.new("L", (28, 28), 128))
TUNED = {"max_batch_size": 2, "max_queue": 3, "inference_workers": 1, "intra_op_threads": 1}
GLOBAL_BATCH, GLOBAL_QUEUE = 4, 16


# -- building model folders ----------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_spec(folder: Path, **changes: Any) -> None:
    (folder / "model.json").write_text(json.dumps({**spec_of(folder), **changes}))


def reseal(folder: Path) -> None:
    write_spec(folder, sha256=sha256(folder / "model.onnx"))


def leaning_lenet(folder: Path, label: int, name: str = "lenet5", **spec: Any) -> None:
    """LeNet-5 that classifies every image as ``label``, in ``folder`` as model ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(LENET / "model.onnx")
    bias = next(t for t in model.graph.initializer if t.name == "classifier.fc3.bias")
    values = numpy_helper.to_array(bias).copy()
    values[label] += 1000.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, folder / "model.onnx")
    document = {**spec_of(LENET), "name": name, "sha256": sha256(folder / "model.onnx"), **spec}
    (folder / "model.json").write_text(json.dumps(document))


def versioned(repo: Path, *labels: int, policy: dict[str, Any] | None = None) -> Path:
    """repo/lenet5 in Triton's layout: version i + 1 leans to ``labels[i]``; ``policy`` goes into
    the newest version's model.json."""
    folder = repo / "lenet5"
    for flat in ("model.json", "model.onnx"):
        (folder / flat).unlink(missing_ok=True)
    for version, label in enumerate(labels, start=1):
        newest = version == len(labels)
        extra = {"version_policy": policy} if newest and policy is not None else {}
        leaning_lenet(folder / str(version), label, **extra)
    return folder


def external_weights_out_of(folder: Path) -> None:
    """The model in ``folder`` with its weights moved to the folder above, where model.onnx's
    external data points."""
    model = onnx.load(folder / "model.onnx")
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=1024)
    (folder / "weights.bin").replace(folder.parent / "weights.bin")
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    for initializer in model.graph.initializer:
        for entry in initializer.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(model, folder / "model.onnx")
    reseal(folder)


BREAKAGES: dict[str, Callable[[Path], None]] = {
    "hash_mismatch": lambda f: (f / "model.onnx").write_bytes((f / "model.onnx").read_bytes() + b"\0"),
    "unreadable_onnx": lambda f: ((f / "model.onnx").write_bytes(b"\x08\x07garbage" * 100), reseal(f)),
    "wrong_input_shape": lambda f: write_spec(f, input={**spec_of(f)["input"], "height": 32}),
    "external_data_outside": external_weights_out_of,
}
REASONS = {
    "hash_mismatch": "model.onnx sha256 is",
    "unreadable_onnx": "not a valid ONNX model",
    "wrong_input_shape": "does not fit NCHW [1, 32, 28]",
    "external_data_outside": "lies outside the model folder",
}


# -- serving them ------------------------------------------------------------------------------


@pytest.fixture
def serve() -> Iterator[Callable[..., Services]]:
    """Builds the services on a repository and loads it; closes them after the test."""
    built: list[Services] = []

    def build(repo: Path, **settings: Any) -> Services:
        services = wiring.build(Settings(models_dir=repo, default_model="lenet5", **settings))
        services.repository.load_all()
        built.append(services)
        return services

    yield build
    for services in built:
        asyncio.run(services.repository.close())


def served(services: Services, name: str = "lenet5") -> list[str]:
    return list(services.repository.versions.get(name, {}))


def top1(services: Services, version: str | None = None, name: str = "lenet5") -> str:
    answer = asyncio.run(services.service.classify(name, IMAGE, top_k=1, version=version))
    return answer.predictions[0].label


def reloaded(services: Services, name: str = "lenet5") -> list[Model]:
    """Loads ``name`` again as its folder now is, and retires what it replaced."""
    retired = services.repository.load(name)
    asyncio.run(services.repository.retire(list(retired)))
    return retired


@pytest.fixture
def repository_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """The repository's log records (an app built earlier in this process stops "cnnserve" from
    propagating to pytest's handler)."""
    monkeypatch.setattr(logging.getLogger("cnnserve"), "propagate", True)
    caplog.set_level(logging.INFO, logger="cnnserve.repository")
    return caplog


# -- 1. versions and their policy ----------------------------------------------------------------


def test_the_newest_version_alone_is_served_by_default(repo_copy, serve):
    versioned(repo_copy, BAG, TROUSER)
    assert served(serve(repo_copy)) == ["2"]


def test_policy_all_serves_every_version_newest_first(repo_copy, serve):
    versioned(repo_copy, BAG, TROUSER, policy={"all": True})
    assert served(serve(repo_copy)) == ["2", "1"]


def test_policy_specific_serves_the_versions_listed(repo_copy, serve):
    versioned(repo_copy, BAG, TROUSER, policy={"specific": [1]})
    assert served(serve(repo_copy)) == ["1"]


def test_policy_latest_serves_the_newest_n(repo_copy, serve):
    versioned(repo_copy, BAG, TROUSER, SANDAL, policy={"latest": 2})
    assert served(serve(repo_copy)) == ["3", "2"]


@pytest.mark.parametrize("odd", ["0", "0001", "\u00b2", "\u0661", "1a", "-1"])
def test_a_folder_whose_name_is_not_a_plain_number_is_no_version(repo_copy, serve, odd):
    folder = versioned(repo_copy, BAG, TROUSER, policy={"all": True})
    leaning_lenet(folder / odd, SANDAL)
    services = serve(repo_copy)
    assert served(services) == ["2", "1"]
    assert top1(services, "1") == LABELS[BAG]


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A server on lenet5 versions 1 (bag), 2 (trouser) and 3 (sandal) with versions 1 and 2
    served, kernels kept flat, and "tuned", a flat LeNet-5 with serving settings of its own."""
    root = tmp_path_factory.mktemp("versions")
    shutil.copytree(LENET, root / "lenet5")
    shutil.copytree(MODELS / "kernels", root / "kernels")
    versioned(root, BAG, TROUSER, SANDAL, policy={"specific": [1, 2]})
    leaning_lenet(root / "tuned", BAG, name="tuned", serving={**TUNED, "max_queue_delay_ms": 1.5})
    settings = Settings(models_dir=root, default_model="lenet5", max_batch_size=GLOBAL_BATCH, max_queue=GLOBAL_QUEUE)
    with running_client(settings) as client:
        yield client


def classify(client: TestClient, query: str) -> Any:
    return client.post(f"/classify?model=lenet5{query}", files={"file": IMAGE})


def v2_infer(client: TestClient, path: str, query: str = "") -> Any:
    batch = np.zeros((1, 1, 28, 28), np.float32)
    tensor = {"name": "input", "shape": list(batch.shape), "datatype": "FP32", "data": batch.ravel().tolist()}
    return client.post(f"/v2/models/{path}/infer{query}", json={"inputs": [tensor]})


def test_models_lists_the_served_versions_and_the_one_a_request_gets(http):
    listed = {m["name"]: m for m in http.get("/models").json()["models"]}
    assert listed["lenet5"]["version"] == "2"
    assert listed["lenet5"]["versions"] == [
        {"version": "2", "status": "ready", "reason": None},
        {"version": "1", "status": "ready", "reason": None},
    ]


@pytest.mark.parametrize(("version", "label"), [("1", BAG), ("2", TROUSER), (None, TROUSER)])
def test_classify_answers_with_the_version_asked_for(http, version, label):
    response = classify(http, f"&version={version}" if version else "")
    assert response.status_code == 200
    assert response.json()["predictions"][0]["label"] == LABELS[label]


@pytest.mark.parametrize("version", ["3", "9"])
def test_classify_with_a_version_not_served_is_404(http, version):
    response = classify(http, f"&version={version}")
    assert response.status_code == 404
    assert "served versions: 2, 1" in response.json()["detail"]


def test_classify_with_a_version_that_is_no_number_is_422(http):
    assert classify(http, "&version=abc").status_code == 422


@pytest.mark.parametrize(("version", "label"), [("1", BAG), ("2", TROUSER)])
def test_v2_infers_on_the_version_in_the_path(http, version, label):
    response = v2_infer(http, f"lenet5/versions/{version}")
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == version
    assert int(np.argmax(body["outputs"][0]["data"])) == label


def test_v2_infer_on_a_version_not_served_is_404(http):
    response = v2_infer(http, "lenet5/versions/3")
    assert response.status_code == 404
    assert "no version '3' served" in response.json()["error"]


def test_a_full_version_refuses_while_another_version_of_the_model_has_room(http):
    """Capacity is each version's own, and a request is refused for the version it names."""
    newest = http.app.state.services.repository.get("lenet5", "2").batcher
    with newest.admission(cost=newest.capacity):
        assert classify(http, "").status_code == 429
        assert classify(http, "&version=2").status_code == 429
        assert classify(http, "&version=1").status_code == 200
        assert v2_infer(http, "lenet5").status_code == 429
        assert v2_infer(http, "lenet5/versions/2").status_code == 429
        assert v2_infer(http, "lenet5/versions/1").status_code == 200
        assert v2_infer(http, "lenet5", "?version=1").status_code == 200  # a query on the route without one


@pytest.mark.parametrize("path", ["/v2/models/lenet5", "/v2/models/lenet5/versions/1"])
def test_v2_metadata_lists_the_served_versions(http, path):
    assert http.get(path).json()["versions"] == ["2", "1"]


def test_a_flat_model_is_version_1(http):
    info = http.get("/models/kernels").json()
    assert info["version"] == "1"
    assert info["versions"] == [{"version": "1", "status": "ready", "reason": None}]
    assert http.get("/v2/models/kernels").json()["versions"] == ["1"]
    assert http.get("/v2/models/kernels/versions/1/ready").status_code == 200


# -- 2. per-model serving settings ----------------------------------------------------------------


def test_models_shows_a_model_s_own_serving_settings(http):
    serving = http.get("/models/tuned").json()["serving"]
    assert serving["max_batch_size"] == 2 and serving["max_queue"] == 3
    assert serving["workers"] == 1 and serving["threads"] == 1
    assert serving["capacity"] == 3 + 2 * 1


def test_models_shows_the_global_serving_settings_for_a_model_without_its_own(http):
    serving = http.get("/models/lenet5").json()["serving"]
    assert serving["max_batch_size"] == GLOBAL_BATCH and serving["max_queue"] == GLOBAL_QUEUE
    assert serving["capacity"] == GLOBAL_QUEUE + GLOBAL_BATCH * serving["workers"]


def test_v2_config_shows_a_model_s_own_batching(http):
    batching = http.get("/v2/models/tuned/config").json()["dynamic_batching"]
    assert batching == {"max_queue_delay_microseconds": 1500, "preferred_batch_size": [2]}


@pytest.fixture
def tuned(repo_copy: Path, serve: Callable[..., Services]) -> Services:
    """lenet5 with TUNED as its serving settings and kernels without, under other global ones."""
    write_spec(repo_copy / "lenet5", serving={**TUNED, "max_queue_delay_ms": 1.5})
    return serve(repo_copy, max_batch_size=GLOBAL_BATCH, max_queue=GLOBAL_QUEUE)


def test_the_batcher_runs_with_the_model_s_own_serving_settings(tuned):
    model = tuned.repository.get("lenet5")
    batcher = model.batcher
    assert (batcher.max_batch, batcher.max_queue, batcher.workers) == (2, 3, 1)
    assert batcher.max_delay == pytest.approx(0.0015)
    assert batcher.capacity == 3 + 2 * 1 and model.plan.threads == 1


def test_other_models_keep_the_global_serving_settings(tuned):
    batcher = tuned.repository.get("kernels").batcher
    assert (batcher.max_batch, batcher.max_queue) == (GLOBAL_BATCH, GLOBAL_QUEUE)
    assert batcher.capacity == GLOBAL_QUEUE + GLOBAL_BATCH * batcher.workers


def queued_behind_held_worker(services: Services, requests: int) -> tuple[list[Any], list[BaseException | None]]:
    """With lenet5's one worker held, ``requests`` one-image batches submitted one after another;
    then the worker is freed. Returns the answers and, per request, the error submit raised."""
    batcher = services.repository.get("lenet5").batcher
    batcher.inline_batch = 0  # LeNet-5 would run small batches on the event loop

    async def scenario() -> tuple[list[Any], list[BaseException | None]]:
        started, hold = threading.Event(), threading.Event()

        def block() -> None:
            started.set()
            hold.wait(10)

        blocker = batcher.call(block, timeout=30)
        await asyncio.to_thread(started.wait, 10)  # the worker took it: the queue is empty
        futures, refusals = [], []
        for _ in range(requests):
            try:
                futures.append(batcher.submit(np.zeros((1, 1, 28, 28), np.float32), timeout=30))
                refusals.append(None)
            except Overloaded as error:
                refusals.append(error)
        hold.set()
        await blocker
        return list(await asyncio.gather(*futures)), refusals

    return asyncio.run(scenario())


def batches_run(services: Services) -> tuple[float, float]:
    """How many batches lenet5 ran, and how many images they held."""
    registry = services.metrics.registry
    count = registry.get_sample_value("cnnserve_batch_size_count", {"model": "lenet5"}) or 0.0
    total = registry.get_sample_value("cnnserve_batch_size_sum", {"model": "lenet5"}) or 0.0
    return count, total


def test_the_model_s_own_queue_bound_refuses_the_request_beyond_it(tuned):
    answers, refusals = queued_behind_held_worker(tuned, 4)
    assert refusals[:3] == [None, None, None] and isinstance(refusals[3], Overloaded)
    assert len(answers) == 3


def test_batches_hold_at_most_the_model_s_own_max_batch_size(tuned):
    before = batches_run(tuned)
    queued_behind_held_worker(tuned, 3)
    count, images = (after - earlier for after, earlier in zip(batches_run(tuned), before, strict=True))
    assert (count, images) == (2, 3)  # 2 + 1, where the global max_batch_size of 4 would run one batch


@pytest.mark.parametrize(
    ("serving", "reason"),
    [
        ({"max_batch_size": 0}, "serving.max_batch_size\n  Input should be greater than or equal to 1"),
        ({"batch_size": 4}, "serving.batch_size\n  Extra inputs are not permitted"),
        ({"inference_workers": 65}, "serving.inference_workers\n  Input should be less than or equal to 64"),
    ],
)
def test_an_invalid_serving_setting_refuses_the_model_with_the_schema_s_reason(repo_copy, serve, serving, reason):
    write_spec(repo_copy / "lenet5", serving=serving)
    info = serve(repo_copy).service.describe("lenet5")
    assert info.status == "failed"
    assert info.reason is not None and "model.json does not match the schema" in info.reason and reason in info.reason


def test_the_committed_json_schema_is_the_one_the_spec_generates():
    assert json.loads((MODELS / "model.schema.json").read_text()) == json_schema()


def test_the_json_schema_takes_version_policies_and_serving_settings():
    schema = json.loads((MODELS / "model.schema.json").read_text())
    for policy in ({"latest": 2}, {"all": True}, {"specific": [1, 3]}, {"latest": 2, "all": False}):
        document = {**spec_of(LENET), "version_policy": policy, "serving": {**TUNED, "max_queue_delay_ms": 2}}
        jsonschema.validate(document, schema)


@pytest.mark.parametrize(
    "change",
    [
        {"serving": {"max_batch_size": 0}},
        {"serving": {"batch_size": 4}},
        {"serving": {"max_queue": 0}},
        {"version_policy": {"latest": 0}},
        {"version_policy": {"specific": []}},
        {"version_policy": {"latest": 2, "all": True}},
        {"version_policy": {"all": True, "specific": [1]}},
        {"version_policy": {"newest": 1}},
    ],
    ids=lambda change: json.dumps(change),
)
def test_the_json_schema_refuses_what_the_loader_refuses(repo_copy, serve, change):
    schema = json.loads((MODELS / "model.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**spec_of(LENET), **change}, schema)
    folder = versioned(repo_copy, BAG)
    write_spec(folder / "1", **change)
    assert serve(repo_copy).service.describe("lenet5").status == "failed"


# -- 3. broken new versions are refused, the old one serves on ------------------------------------


@pytest.fixture
def broken_second(request: pytest.FixtureRequest, repo_copy: Path, serve: Callable[..., Services]) -> Services:
    """lenet5 version 1 (bag) served, then a version 2 broken as the test's parameter says, and
    lenet5 loaded again."""
    folder = versioned(repo_copy, BAG)
    services = serve(repo_copy)
    leaning_lenet(folder / "2", TROUSER)
    BREAKAGES[request.param](folder / "2")
    assert reloaded(services) == []
    return services


@pytest.mark.parametrize("broken_second", sorted(BREAKAGES), indirect=True)
def test_a_broken_new_version_is_failed_with_its_reason(broken_second, request):
    reason = REASONS[request.node.callspec.params["broken_second"]]
    assert reason in broken_second.repository.failed_versions["lenet5"]["2"]
    ready, failed = broken_second.service.describe("lenet5").versions
    assert ready == VersionStatus(version="1", status="ready")
    assert failed.version == "2" and failed.status == "failed" and reason in (failed.reason or "")


@pytest.mark.parametrize("broken_second", sorted(BREAKAGES), indirect=True)
def test_the_old_version_serves_on_beside_a_broken_new_one(broken_second):
    assert served(broken_second) == ["1"]
    assert top1(broken_second) == LABELS[BAG]


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_new_version_is_logged_with_its_reason(repo_copy, serve, repository_log, breakage):
    folder = versioned(repo_copy, BAG)
    services = serve(repo_copy)
    leaning_lenet(folder / "2", TROUSER)
    BREAKAGES[breakage](folder / "2")
    repository_log.clear()
    reloaded(services)
    errors = [r.getMessage() for r in repository_log.records if r.levelno == logging.ERROR]
    assert any("refused model lenet5 version 2" in m and REASONS[breakage] in m for m in errors), errors


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_new_files_of_a_served_version_leave_it_serving_with_the_reason_shown(repo_copy, serve, breakage):
    """A flat model replaced in place: its version 1 keeps the model loaded before."""
    leaning_lenet(repo_copy / "lenet5", BAG)
    services = serve(repo_copy)
    leaning_lenet(repo_copy / "lenet5", TROUSER)
    BREAKAGES[breakage](repo_copy / "lenet5")
    assert reloaded(services) == []
    (status,) = services.service.describe("lenet5").versions
    assert status.version == "1" and status.status == "ready" and REASONS[breakage] in (status.reason or "")
    assert top1(services) == LABELS[BAG]


def test_a_model_broken_at_first_load_is_refused_with_its_reason(repo_copy, serve):
    BREAKAGES["hash_mismatch"](repo_copy / "lenet5")
    services = serve(repo_copy)
    info = services.service.describe("lenet5")
    assert info.status == "failed" and "model.onnx sha256 is" in (info.reason or "")
    assert info.versions[0].status == "failed"


def test_a_refused_model_is_served_once_fixed_and_loaded_again(repo_copy, serve):
    BREAKAGES["hash_mismatch"](repo_copy / "lenet5")
    services = serve(repo_copy)
    leaning_lenet(repo_copy / "lenet5", SANDAL)
    reloaded(services)
    info = services.service.describe("lenet5")
    assert info.status == "ready" and info.versions == [VersionStatus(version="1", status="ready")]
    assert "lenet5" not in services.repository.refused
    assert top1(services) == LABELS[SANDAL]


# -- 4. a reload under a request in flight -----------------------------------------------------------


def swap_under_a_held_request(services: Services, folder: Path) -> dict[str, Any]:
    """A request is admitted on the old lenet5 and waits behind its held worker while the folder
    is rewritten (to a sandal model), lenet5 reloaded and the old model retired; a second request
    comes after the swap; then the worker is freed."""
    old = services.repository.get("lenet5")
    old.batcher.inline_batch = 0  # the first request must queue on the worker, not run on the loop
    seen: dict[str, Any] = {"old": old}

    async def scenario() -> None:
        hold = threading.Event()
        blocker = old.batcher.call(lambda: hold.wait(10), timeout=30)
        first = asyncio.ensure_future(services.service.classify("lenet5", IMAGE, top_k=1))
        await asyncio.sleep(0.05)
        seen["admitted"] = old.batcher.admitted
        leaning_lenet(folder, SANDAL)
        retired = await asyncio.to_thread(services.repository.load, "lenet5")
        seen["retired"] = list(retired)
        retiring = asyncio.ensure_future(services.repository.retire(retired))
        second = await services.service.classify("lenet5", IMAGE, top_k=1)
        seen["second"] = second.predictions[0].label
        await asyncio.sleep(0.1)
        seen["closed before the answer"] = retiring.done() or not old.batcher.threads
        hold.set()
        await blocker
        seen["first"] = (await first).predictions[0].label
        await asyncio.wait_for(retiring, 10)
        seen["closed after the answer"] = not old.batcher.threads

    asyncio.run(scenario())
    return seen


@pytest.fixture
def swapped(repo_copy: Path, serve: Callable[..., Services]) -> dict[str, Any]:
    leaning_lenet(repo_copy / "lenet5", BAG)
    return swap_under_a_held_request(serve(repo_copy), repo_copy / "lenet5")


def test_a_request_admitted_before_a_reload_answers_from_the_old_model(swapped):
    assert swapped["admitted"] == 1
    assert swapped["first"] == LABELS[BAG]


def test_a_request_after_the_reload_gets_the_new_model(swapped):
    assert swapped["retired"] == [swapped["old"]]
    assert swapped["second"] == LABELS[SANDAL]


def test_the_old_model_is_closed_once_its_last_request_answered_not_before(swapped):
    assert swapped["closed before the answer"] is False
    assert swapped["closed after the answer"] is True


# -- 5. nothing outside the repository -------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "../lenet5", "lenet5/..", "lenet5\n", "/etc", ".hidden"])
def test_a_name_that_is_not_one_plain_path_segment_is_a_bad_request(repo_copy, serve, name):
    with pytest.raises(BadRequest):
        serve(repo_copy).repository.folder(name)


def test_a_missing_model_folder_is_not_found(repo_copy, serve):
    with pytest.raises(NotFound):
        serve(repo_copy).repository.folder("nope")


@pytest.fixture
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good lenet5 model folder outside the repository."""
    outside = tmp_path_factory.mktemp("elsewhere") / "lenet5"
    shutil.copytree(LENET, outside)
    return outside


def test_a_link_to_a_model_folder_outside_the_repository_is_not_found(repo_copy, serve, elsewhere):
    (repo_copy / "linked").symlink_to(elsewhere, target_is_directory=True)
    repository = serve(repo_copy).repository
    with pytest.raises(NotFound):
        repository.folder("linked")
    with pytest.raises(NotFound):
        repository.load("linked")


def test_a_model_folder_linking_out_of_the_repository_is_refused_at_start(repo_copy, serve, elsewhere):
    shutil.rmtree(repo_copy / "lenet5")
    (repo_copy / "lenet5").symlink_to(elsewhere, target_is_directory=True)
    services = serve(repo_copy)
    info = services.service.describe("lenet5")
    assert info.status == "failed" and "no model folder" in (info.reason or "")
    assert services.service.describe("kernels").status == "ready"


def test_a_version_folder_linking_outside_the_repository_is_not_served(repo_copy, serve, elsewhere):
    folder = versioned(repo_copy, BAG, policy={"all": True})
    (folder / "2").symlink_to(elsewhere, target_is_directory=True)
    services = serve(repo_copy)
    assert served(services) == ["1"]
    assert top1(services) == LABELS[BAG]


@pytest.mark.parametrize("name", ["model.onnx", "model.json"])
def test_a_model_file_linking_out_of_its_folder_is_refused(repo_copy, serve, elsewhere, name):
    (repo_copy / "lenet5" / name).unlink()
    (repo_copy / "lenet5" / name).symlink_to(elsewhere / name)
    info = serve(repo_copy).service.describe("lenet5")
    assert info.status == "failed" and f"{name} lies outside the model folder" in (info.reason or "")
