"""Untrusted input, abandoned requests, access control, hostile model folders and shutdown."""

import asyncio
import http.client
import json
import shutil
import signal
import threading
import time

import numpy as np
import onnx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.http.app import create_app

from ..conftest import MODELS, asgi_post, live_server, running_client, spec_of

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded():
    with running_client(Settings(models_dir=MODELS, api_key=KEY, cors_origins="https://app.example")) as client:
        yield client


def test_without_the_api_key_requests_are_401(guarded, photos):
    response = guarded.post("/classify", files={"file": photos["chelsea"].read_bytes()})
    assert response.status_code == 401 and response.headers["www-authenticate"] == 'Bearer realm="cnnserve"'
    assert "API key" in response.json()["detail"]


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}])
def test_the_api_key_opens_the_api(guarded, photos, headers):
    assert guarded.post("/classify", files={"file": photos["chelsea"].read_bytes()}, headers=headers).status_code == 200


def test_under_v2_a_missing_api_key_is_an_error_body(guarded):
    response = guarded.get("/v2/models/lenet5")
    assert response.status_code == 401 and "API key" in response.json()["error"]
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_wrong_api_key_is_401(guarded):
    assert guarded.get("/models", headers={"X-API-Key": KEY + "x"}).status_code == 401
    assert guarded.get("/metrics").status_code == 401


def test_probes_need_no_api_key(guarded):
    assert guarded.get("/healthz").status_code == 200 and guarded.get("/readyz").status_code == 200


def test_cors_allows_the_configured_origin_only(guarded):
    preflight = {"Access-Control-Request-Method": "POST"}
    allowed = guarded.options("/classify", headers={"Origin": "https://app.example", **preflight})
    other = guarded.options("/classify", headers={"Origin": "https://evil.example", **preflight})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers


def dropped(client, reason: str) -> float:
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(
        s.value
        for s in families["cnnserve_dropped"].samples
        if s.name.endswith("_total") and s.labels["reason"] == reason
    )


def test_a_client_that_hangs_up_costs_no_inference(photos):
    """Drive the ASGI app directly so the connection can 'close' while the request is queued
    behind a batch that is held running."""
    settings = Settings(models_dir=MODELS, default_model="lenet5")
    image = photos["chelsea"].read_bytes()
    with running_client(settings) as client:
        app = client.app
        model = app.state.services.repository.models["lenet5"]
        hold, ran = threading.Event(), []
        original = model.batcher.run

        def held_run(batch):
            ran.append(len(batch))
            hold.wait(10)
            return original(batch)

        model.batcher.run = held_run
        first = threading.Thread(
            target=client.post, args=("/classify",), kwargs={"content": image, "headers": {"content-type": "image/png"}}
        )
        first.start()
        while not ran:
            time.sleep(0.01)

        async def hang_up() -> list[dict]:
            gone = asyncio.Event()
            messages = iter([{"type": "http.request", "body": image, "more_body": False}])

            async def receive():
                message = next(messages, None)
                if message is not None:
                    return message
                await gone.wait()
                return {"type": "http.disconnect"}

            sent = []

            async def send(message):
                sent.append(message)

            scope = asgi_post("/classify", [])
            request = asyncio.ensure_future(app(scope, receive, send))
            await asyncio.sleep(0.3)
            gone.set()
            await request
            return sent

        sent = client.portal.call(hang_up)
        hold.set()
        first.join()
        assert sent[0]["status"] == 499
        assert ran == [1]  # only the first request ran; the abandoned one was dropped from the queue
        assert dropped(client, "client gone") == 1


def external_data_model(folder, location: str) -> None:
    shutil.copytree(MODELS / "lenet5", folder)
    model = onnx.load(folder / "model.onnx")
    onnx.save(
        model,
        folder / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=1024,
    )
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, folder / "model.onnx")
    import hashlib

    spec = {
        **spec_of(folder),
        "name": folder.name,
        "sha256": hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest(),
    }
    (folder / "model.json").write_text(json.dumps(spec))


def test_external_data_outside_the_model_folder_is_refused(tmp_path, photos):
    external_data_model(tmp_path / "inside", "weights.bin")
    external_data_model(tmp_path / "escaping", "../inside/weights.bin")
    with running_client(Settings(models_dir=tmp_path, default_model="inside")) as client:
        escaping = client.get("/models/escaping").json()
        assert escaping["status"] == "failed" and "outside the model folder" in escaping["reason"]
        assert client.post("/classify?model=inside", files={"file": photos["chelsea"].read_bytes()}).status_code == 200
        layers = client.get("/models/inside/layers")
        assert layers.status_code == 200 and layers.json()["layers"][0]["output_shape"] == [6, 28, 28]


def test_sigterm_drains_then_exits_without_failing_accepted_requests(photos):
    image = photos["coffee"].read_bytes()
    with live_server(CNNSERVE_DRAIN_SECONDS="1.5", CNNSERVE_DEFAULT_MODEL="lenet5") as (url, server):
        port = int(url.rsplit(":", 1)[1])

        def request(method: str, path: str, body: bytes | None = None) -> int:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                connection.request(method, path, body=body, headers={"content-type": "image/png"} if body else {})
                return connection.getresponse().status
            finally:
                connection.close()

        results, stop = [], threading.Event()

        def load():
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    results.append((sent, request("POST", "/classify?model=efficientnet_lite0", image)))
                except OSError:
                    results.append((sent, "refused"))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        readiness_during_drain = request("GET", "/readyz")
        server.wait(timeout=60)
        stop.set()
        for thread in threads:
            thread.join()
        before = [status for sent, status in results if sent < signalled]
        assert readiness_during_drain == 503
        assert len(before) > 4 and set(before) == {200}
        assert np.isin(server.returncode, [0, -signal.SIGTERM])


def test_the_app_answers_probes_while_models_load(tmp_path):
    shutil.copytree(MODELS / "efficientnet_lite0", tmp_path / "efficientnet_lite0")
    app = create_app(Settings(models_dir=tmp_path))
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code in (200, 503)


def test_a_client_that_hangs_up_mid_upload_is_499_not_a_server_error(photos):
    with running_client(Settings(models_dir=MODELS, default_model="lenet5")) as client:
        app = client.app

        async def hang_up_while_sending() -> list[dict]:
            async def receive():
                return {"type": "http.disconnect"}

            sent = []

            async def send(message):
                sent.append(message)

            scope = asgi_post("/classify", [(b"content-length", b"1000")])
            await app(scope, receive, send)
            return sent

        sent = client.portal.call(hang_up_while_sending)
        assert sent[0]["status"] == 499
        assert client.get("/healthz").status_code == 200


def test_the_app_takes_settings_or_services_built_from_them_not_both(repo_copy):
    from app.serving import services as wiring

    services = wiring.build(Settings(models_dir=repo_copy))
    with pytest.raises(ValueError, match="not both"):
        create_app(Settings(models_dir=repo_copy), services=services)
    assert create_app(services=services).state.services is services
