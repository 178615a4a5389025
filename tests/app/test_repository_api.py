"""The model repository API (the Open Inference Protocol's repository extension) spoken by NVIDIA's
own client, tritonclient[http], to a real server started with `cnnserve serve --model-control ...`
on a scratch copy of the repository; and what it refuses: uploads, names that are no model folder,
links out of the repository, callers without the API key, and the whole API when it is off."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from app.cli import parse_args, serve_settings_of
from app.config import Settings

from ..conftest import MODELS, ROOT, free_port, running_client, wait_ready

SERVED_AT_START = ("lenet5", "kernels")
API_PATHS = ("/v2/repository/index", "/v2/repository/models/kernels/load", "/v2/repository/models/lenet5/unload")
TRAVERSAL_PATHS = [
    "/v2/repository/models/../load",
    "/v2/repository/models/%2E%2E/load",
    "/v2/repository/models/a%2Fb/load",
    "/v2/repository/models/lenet5%2F../load",
    "/v2/repository/models/lenet5/../kernels/load",
    "/v2/repository/models/..%2F..%2Fetc/load",
    "/v2/repository/models/../unload",
    "/v2/repository/models/a%2Fb/unload",
]


@contextmanager
def cnnserve(repository: Path, *options: str, **env: str) -> Iterator[tuple[str, Path]]:
    """``cnnserve serve`` with these options on ``repository`` (one process, lenet5 the default
    model), ready when yielded, stopped with SIGTERM afterwards; its log goes to a file beside."""
    port = free_port()
    log = repository.parent / f"{repository.name}-server.log"
    command = [sys.executable, "-m", "app", "serve", "--port", str(port), "--processes", "1"]
    command += ["--models-dir", str(repository), "--default-model", "lenet5", *options]
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, stdout=output, stderr=output
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process, in_a_row=1)
            yield url, log
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


@pytest.fixture
def explicit(repo_copy) -> Iterator[tuple[str, Path]]:
    """Explicit model control, lenet5 and kernels loaded at start through --load-model."""
    loads = [option for name in SERVED_AT_START for option in ("--load-model", name)]
    with cnnserve(repo_copy, "--model-control", "explicit", *loads) as running:
        yield running


@pytest.fixture
def client(explicit) -> Iterator[triton.InferenceServerClient]:
    url, _ = explicit
    client = triton.InferenceServerClient(url=url.removeprefix("http://"))
    yield client
    client.close()


def batch() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)


def infer(client: triton.InferenceServerClient, name: str = "lenet5") -> np.ndarray:
    given = triton.InferInput("input", [4, 1, 28, 28], "FP32")
    given.set_data_from_numpy(batch(), binary_data=True)
    result = client.infer(name, [given], outputs=[triton.InferRequestedOutput("logits", binary_data=True)])
    return result.as_numpy("logits")


def raw_post(url: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """POST ``path`` exactly as written: http.client neither normalises ``..`` nor decodes ``%2F``,
    as httpx and browsers would."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    try:
        connection.request("POST", path, body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def ready_names(client: triton.InferenceServerClient) -> set[str]:
    return {row["name"] for row in client.get_model_repository_index() if row["state"] == "READY"}


# -- the round trip, with tritonclient ----------------------------------------------------------


def test_tritonclient_round_trip_unload_then_load_gives_the_same_outputs(client):
    index = client.get_model_repository_index()
    assert {"name": "lenet5", "version": "1", "state": "READY"} in index  # no empty reason, as Triton
    assert {"name": "kernels", "version": "1", "state": "READY"} in index
    assert "model_repository" in client.get_server_metadata()["extensions"]
    before = infer(client)

    client.unload_model("lenet5")
    assert not client.is_model_ready("lenet5")
    with pytest.raises(InferenceServerException):
        infer(client)
    assert {"name": "lenet5", "state": "UNLOADED"} in client.get_model_repository_index()
    assert client.is_model_ready("kernels")

    client.load_model("lenet5")
    assert client.is_model_ready("lenet5")
    assert np.allclose(infer(client), before)
    assert ready_names(client) == set(SERVED_AT_START)


def test_a_broken_change_is_refused_with_its_reason_and_the_old_version_goes_on_answering(client, repo_copy):
    before = infer(client)
    (repo_copy / "lenet5" / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("lenet5")
    assert "sha256" in refused.value.message()
    assert refused.value.status() == "400"
    assert client.is_model_ready("lenet5")
    assert np.allclose(infer(client), before)


def test_a_broken_model_never_served_is_refused_with_its_reason_and_listed_unavailable(client, repo_copy):
    shutil.copytree(MODELS / "kernels", repo_copy / "kernels2")
    (repo_copy / "kernels2" / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("kernels2")
    assert refused.value.status() == "400" and "kernels2" in refused.value.message()
    assert not client.is_model_ready("kernels2")
    (row,) = [row for row in client.get_model_repository_index() if row["name"] == "kernels2"]
    assert row["state"] == "UNAVAILABLE" and row["reason"]


def test_loading_an_unknown_model_is_404_and_unloading_one_is_200_as_in_triton(client, explicit):
    url, _ = explicit
    with pytest.raises(InferenceServerException) as unknown:
        client.load_model("no_such_model")
    assert unknown.value.status() == "404"
    client.unload_model("no_such_model")  # Triton answers 200: it stays unloaded
    assert raw_post(url, "/v2/repository/models/no_such_model/unload") == (200, b"")


def test_a_load_that_uploads_a_configuration_or_files_is_refused(client):
    with pytest.raises(InferenceServerException, match="never accepts"):
        client.load_model("lenet5", config=json.dumps({"name": "lenet5"}))
    with pytest.raises(InferenceServerException, match="never accepts"):
        client.load_model("lenet5", files={"file:1/model.onnx": b"\x08\x07"})
    assert client.is_model_ready("lenet5")


# -- what never reaches a model folder ---------------------------------------------------------------


@pytest.mark.parametrize("path", TRAVERSAL_PATHS)
def test_names_that_are_no_model_name_are_refused_before_any_lookup(explicit, path):
    url, _ = explicit
    status, body = raw_post(url, path)
    assert status == 400, body
    assert "is not a model name" in json.loads(body)["error"]


def test_tritonclient_names_with_slashes_and_dots_never_load(client):
    for name in ("..", "a/b", "lenet5/..", "../lenet5", ".hidden", "LENET5"):
        with pytest.raises(InferenceServerException) as refused:
            client.load_model(name)
        assert refused.value.status() in ("400", "404"), name
    assert ready_names(client) == set(SERVED_AT_START)


def test_a_link_out_of_the_repository_is_no_model(client, repo_copy, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copytree(MODELS / "lenet5", elsewhere / "outside")
    (repo_copy / "outside").symlink_to(elsewhere / "outside", target_is_directory=True)
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("outside")
    assert refused.value.status() == "404"
    assert not client.is_model_ready("outside")
    assert ready_names(client) == set(SERVED_AT_START)


def test_a_model_file_linked_from_outside_is_refused(client, repo_copy, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copyfile(MODELS / "lenet5" / "model.onnx", elsewhere / "model.onnx")
    (repo_copy / "linked").mkdir()
    spec = json.loads((MODELS / "lenet5" / "model.json").read_text())
    (repo_copy / "linked" / "model.json").write_text(json.dumps({**spec, "name": "linked"}))
    (repo_copy / "linked" / "model.onnx").symlink_to(elsewhere / "model.onnx")
    with pytest.raises(InferenceServerException, match=r"model\.onnx lies outside the model folder") as refused:
        client.load_model("linked")
    assert refused.value.status() == "400"
    assert not client.is_model_ready("linked")


def test_a_model_json_linked_from_outside_is_never_read(client, repo_copy, tmp_path_factory):
    """Read, its contents would come back in the reason it was refused (pydantic quotes the input)."""
    secret = tmp_path_factory.mktemp("elsewhere") / "credentials.json"
    secret.write_text(json.dumps({"token": "do-not-show-me"}))
    (repo_copy / "leaky").mkdir()
    (repo_copy / "leaky" / "model.json").symlink_to(secret)
    with pytest.raises(InferenceServerException, match=r"model\.json lies outside the model folder") as refused:
        client.load_model("leaky")
    assert "do-not-show-me" not in refused.value.message()
    assert "do-not-show-me" not in json.dumps(client.get_model_repository_index())


# -- the modes, the key and the command line (in-process where a socket adds nothing) -------------------


def settings(repository: Path, **overrides: object) -> Settings:
    return Settings(models_dir=repository, default_model="lenet5", **overrides)


def test_with_model_control_none_the_api_is_unknown_and_not_announced(repo_copy):
    with running_client(settings(repo_copy)) as client:
        for path in API_PATHS:
            response = client.post(path)
            assert response.status_code == 404, path
            assert response.json() == {"error": "Not Found"}
        assert "model_repository" not in client.get("/v2").json()["extensions"]
        assert client.get("/v2/models/lenet5/ready").status_code == 200


def test_explicit_mode_serves_only_the_models_named_and_lists_the_others_unloaded(repo_copy):
    with running_client(settings(repo_copy, model_control="explicit", load_models="lenet5")) as client:
        assert [m["name"] for m in client.get("/models").json()["models"]] == ["lenet5"]
        assert client.post("/v2/repository/index").json() == [
            {"name": "kernels", "state": "UNLOADED"},
            {"name": "lenet5", "version": "1", "state": "READY"},
        ]
        ready = client.post("/v2/repository/index", json={"ready": True}).json()
        assert ready == [{"name": "lenet5", "version": "1", "state": "READY"}]
        assert client.get("/v2/models/kernels/ready").status_code == 404


def test_poll_mode_offers_the_api_too(repo_copy):
    with running_client(settings(repo_copy, model_control="poll", poll_interval_s=60)) as client:
        assert "model_repository" in client.get("/v2").json()["extensions"]
        assert client.post("/v2/repository/models/kernels/unload").status_code == 200
        assert client.get("/v2/models/kernels/ready").status_code == 404
        assert client.post("/v2/repository/models/kernels/load", content=b"").status_code == 200
        assert client.get("/v2/models/kernels/ready").status_code == 200


@pytest.fixture
def managed(repo_copy) -> Iterator[TestClient]:
    with running_client(settings(repo_copy, model_control="explicit", load_models="lenet5")) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/v2/repository/index", b"not json", "not JSON"),
        ("/v2/repository/index", b"[]", "JSON object"),
        ("/v2/repository/index", b'{"ready": "yes"}', "'ready'"),
        ("/v2/repository/models/kernels/load", b'{"parameters": []}', "'parameters'"),
        ("/v2/repository/models/kernels/load", b'{"parameters": {"path": "/etc"}}', "unrecognized load parameters"),
        ("/v2/repository/models/kernels/load", b'{"parameters": {"file:model.onnx": "AAAA"}}', "never accepts"),
    ],
)
def test_malformed_bodies_and_unknown_parameters_are_400_and_load_nothing(managed, path, body, says):
    response = managed.post(path, content=body)
    assert response.status_code == 400
    assert says in response.json()["error"]
    assert managed.get("/v2/models/kernels/ready").status_code == 404


def test_the_api_needs_the_key_when_one_is_set(repo_copy):
    key = "repository-secret"
    with running_client(settings(repo_copy, model_control="explicit", load_models="lenet5", api_key=key)) as client:
        for path in API_PATHS:
            response = client.post(path)
            assert response.status_code == 401, path
            assert "API key" in response.json()["error"]
        assert client.post("/v2/repository/models/kernels/load", headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.get("/v2/models/lenet5/ready", headers={"X-API-Key": key}).status_code == 200
        assert client.get("/v2/models/kernels/ready", headers={"X-API-Key": key}).status_code == 404
        authorized = {"Authorization": f"Bearer {key}"}
        assert client.post("/v2/repository/models/kernels/load", headers=authorized).status_code == 200
        assert client.post("/v2/repository/index", headers=authorized).status_code == 200


def test_the_command_line_options_become_the_model_control_settings():
    loads = ["--load-model", "lenet5", "--load-model", "kernels"]
    chosen = serve_settings_of(parse_args(["serve", "--model-control", "explicit", *loads, "--poll-interval", "0.5"]))
    assert chosen.model_control == "explicit"
    assert chosen.load_models == "lenet5,kernels" and chosen.load_model_list == ["lenet5", "kernels"]
    assert chosen.poll_interval_s == 0.5
    defaults = serve_settings_of(parse_args(["serve"]))
    assert (defaults.model_control, defaults.load_models) == (Settings().model_control, Settings().load_models)


def test_the_command_line_refuses_an_unknown_mode(capsys):
    with pytest.raises(SystemExit):
        parse_args(["serve", "--model-control", "sometimes"])
    assert "invalid choice" in capsys.readouterr().err
