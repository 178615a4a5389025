"""The Open Inference Protocol over gRPC, spoken by NVIDIA's own client (tritonclient.grpc,
unchanged) to a real `cnnserve serve` (its server processes each serving gRPC on the shared port):
the same answers as HTTP V2, the right status codes for bad requests, the API key, the metrics,
the repository extension, and request ids in answers and log lines."""

import asyncio
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from app.config import Settings
from app.grpc.server import serving
from app.serving import preprocess
from app.serving import services as wiring
from app.serving.spec import ModelSpec

from ..conftest import MODELS, free_port, live_server

KEY = "grpc-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}  # passed as a copy: tritonclient.http adds its own headers to it
MESSAGE_LIMIT = 2 << 20  # one 224x224 RGB tensor fits, in FP32 (588 KiB) or FP64; four in FP32 do not
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "grace_hopper"]
EFFICIENTNET = ModelSpec.model_validate_json((MODELS / "efficientnet_lite0" / "model.json").read_text())


@dataclass
class Server:
    url: str
    grpc: str
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    port = free_port()
    environment = {
        "CNNSERVE_GRPC_PORT": str(port),
        "CNNSERVE_GRPC_MAX_MESSAGE_BYTES": str(MESSAGE_LIMIT),
        "CNNSERVE_API_KEY": KEY,
        "CNNSERVE_MODEL_CONTROL": "explicit",
        "CNNSERVE_LOAD_MODELS": "efficientnet_lite0,lenet5",
    }
    with log.open("w") as output, live_server(output=output, **environment) as (url, _):
        yield Server(url, f"127.0.0.1:{port}", log)


@pytest.fixture(scope="module")
def client(server):
    client = triton_grpc.InferenceServerClient(server.grpc)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http_client(server):
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server):
    """tritonclient's generated stub, for what its client does not expose (typed contents, metadata)."""
    with grpc.insecure_channel(server.grpc) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def tensor(path: Path) -> np.ndarray:
    """The photo preprocessed exactly as /classify does it."""
    return preprocess.prepare(path.read_bytes(), EFFICIENTNET.input, 50_000_000)


def infer_grpc(client, batch: np.ndarray, class_count: int = 0, name: str = "input", datatype: str = "FP32", **kw):
    given = triton_grpc.InferInput(name, list(batch.shape), datatype)
    given.set_data_from_numpy(batch)
    wanted = triton_grpc.InferRequestedOutput("logits", class_count=class_count)
    return client.infer(kw.pop("model", "efficientnet_lite0"), [given], outputs=[wanted], headers=dict(AUTH), **kw)


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return refused.value


def lines_of(server: Server) -> list[str]:
    return server.log.read_text().splitlines()


def test_health_and_readiness(client):
    assert client.is_server_live() and client.is_server_ready()  # the probes need no key
    assert client.is_model_ready("efficientnet_lite0", headers=dict(AUTH))
    assert not client.is_model_ready("no_such_model", headers=dict(AUTH))


def test_server_metadata_names_the_extensions(client):
    metadata = client.get_server_metadata(headers=dict(AUTH))
    assert metadata.name == "cnnserve"
    assert set(metadata.extensions) == {"classification", "model_repository"}


def test_model_metadata_gives_tensor_names_types_and_a_dynamic_batch(client):
    metadata = client.get_model_metadata("efficientnet_lite0", headers=dict(AUTH), as_json=True)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", "224", "224"]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "1000"]}]
    assert metadata["versions"] == ["1"] and metadata["platform"] == "onnxruntime_onnx"


@pytest.mark.parametrize("photo", PHOTOS)
def test_grpc_gives_the_logits_and_top5_of_http_v2(client, http_client, photos, photo):
    image = tensor(photos[photo])
    over_grpc = infer_grpc(client, image, request_id=photo)
    given = triton_http.InferInput("input", list(image.shape), "FP32")
    given.set_data_from_numpy(image, binary_data=True)
    over_http = http_client.infer("efficientnet_lite0", [given], headers=dict(AUTH)).as_numpy("logits")
    logits = over_grpc.as_numpy("logits")
    assert over_grpc.get_response().id == photo
    assert logits.shape == (1, 1000) and np.allclose(logits, over_http, rtol=0, atol=1e-5)
    assert list(np.argsort(-logits[0])[:5]) == list(np.argsort(-over_http[0])[:5])


def test_typed_contents_give_the_same_logits_as_raw_contents(client, stub, photos):
    image = tensor(photos["coffee"])
    request = service_pb2.ModelInferRequest(model_name="efficientnet_lite0")
    request.inputs.add(name="input", datatype="FP32", shape=image.shape).contents.fp32_contents.extend(image.ravel())
    response = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    typed = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    assert np.allclose(typed, infer_grpc(client, image).as_numpy("logits"), rtol=0, atol=1e-5)


def test_classification_extension_gives_value_index_label(client, photos):
    result = infer_grpc(client, tensor(photos["coffee"]), class_count=3)
    entries = [entry.decode().split(":", 2) for entry in result.as_numpy("logits")[0]]
    assert len(entries) == 3 and "espresso" in entries[0][2]
    logits = infer_grpc(client, tensor(photos["coffee"])).as_numpy("logits")[0]
    assert [int(index) for _, index, _ in entries] == list(np.argsort(-logits)[:3])


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"batch": np.zeros((1, 1, 224, 224), np.float32)}, "StatusCode.INVALID_ARGUMENT"),  # wrong shape
        ({"batch": np.zeros((1, 3, 224, 224), np.float64), "datatype": "FP64"}, "StatusCode.INVALID_ARGUMENT"),
        ({"name": "image"}, "StatusCode.INVALID_ARGUMENT"),  # the model's one input is missing
        ({"model": "no_such_model"}, "StatusCode.NOT_FOUND"),
        ({"batch": np.zeros((4, 3, 224, 224), np.float32)}, "StatusCode.RESOURCE_EXHAUSTED"),  # over the limit
    ],
    ids=["shape", "datatype", "missing input", "unknown model", "oversize"],
)
def test_bad_requests_get_their_status_code_and_the_service_goes_on(client, photos, change, code):
    batch = change.pop("batch", np.zeros((1, 3, 224, 224), np.float32))
    refused = refusal(lambda: infer_grpc(client, batch, **change))
    assert refused.status() == code
    assert infer_grpc(client, tensor(photos["chelsea"])).as_numpy("logits").shape == (1, 1000)


def test_calls_without_the_api_key_are_unauthenticated(client, photos):
    refused = refusal(lambda: client.get_model_metadata("efficientnet_lite0"))
    assert refused.status() == "StatusCode.UNAUTHENTICATED"
    given = triton_grpc.InferInput("input", [1, 3, 224, 224], "FP32")
    given.set_data_from_numpy(tensor(photos["chelsea"]))
    wrong = {"authorization": "Bearer not-the-key"}
    assert refusal(lambda: client.infer("efficientnet_lite0", [given], headers=wrong)).status() == (
        "StatusCode.UNAUTHENTICATED"
    )


def test_the_repository_extension_loads_and_unloads_and_logs_with_the_request_id(client, server):
    index = client.get_model_repository_index(headers=dict(AUTH), as_json=True)["models"]
    assert {"name": "kernels", "state": "UNLOADED"} in index
    client.load_model("kernels", headers={**AUTH, "x-request-id": "load-kernels-7"})
    assert client.is_model_ready("kernels", headers=dict(AUTH))
    client.unload_model("kernels", headers=dict(AUTH))
    assert not client.is_model_ready("kernels", headers=dict(AUTH))
    lines = lines_of(server)
    assert any("loaded model kernels" in line and line.endswith("request_id=load-kernels-7") for line in lines)


def test_answers_carry_the_request_id_and_http_access_lines_too(stub, server):
    _, call = stub.ServerLive.with_call(service_pb2.ServerLiveRequest(), metadata=(("x-request-id", "grpc-42"),))
    assert dict(call.initial_metadata())["x-request-id"] == "grpc-42"
    request = urllib.request.Request(f"{server.url}/healthz", headers={"X-Request-ID": "http-42"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["X-Request-ID"] == "http-42"
    assert any('"GET /healthz HTTP/1.1" 200' in line and "request_id=http-42" in line for line in lines_of(server))


def test_requests_are_counted_with_their_protocol(client, server, photos):
    infer_grpc(client, tensor(photos["chelsea"]))
    request = urllib.request.Request(f"{server.url}/metrics", headers=dict(AUTH))
    with urllib.request.urlopen(request, timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    counts = {
        (s.labels["protocol"], s.labels["endpoint"], s.labels["model"], s.labels["status"]): s.value
        for s in families["cnnserve_requests"].samples
        if s.name == "cnnserve_requests_total"
    }
    assert counts[("grpc", "/inference.GRPCInferenceService/ModelInfer", "efficientnet_lite0", "OK")] >= 1
    assert counts[("grpc", "/inference.GRPCInferenceService/ModelInfer", "", "NOT_FOUND")] >= 1
    assert counts[("http", "/v2/models/{name}/infer", "efficientnet_lite0", "200")] >= 1


def test_the_message_limit_defaults_to_the_http_body_limit():
    settings = Settings(max_body_bytes=12345)
    assert settings.grpc_message_limit == 12345
    assert Settings(max_body_bytes=12345, grpc_max_message_bytes=99999).grpc_message_limit == 99999


def test_every_server_process_serves_grpc(server):
    lines = lines_of(server)
    processes = sum("Application startup complete" in line for line in lines)
    assert processes >= 1 and sum("gRPC (Open Inference Protocol) on" in line for line in lines) == processes


def test_server_ready_turns_false_while_the_process_drains(tmp_path):
    shutil.copytree(MODELS / "lenet5", tmp_path / "lenet5")
    services = wiring.build(Settings(models_dir=tmp_path, default_model="lenet5", grpc_port=free_port()))
    services.control.load_initial()

    async def scenario():
        async with serving(services) as port:
            client = triton_grpc_aio.InferenceServerClient(f"127.0.0.1:{port}")
            before = await client.is_server_ready()
            services.lifecycle.draining = True  # what SIGTERM does (app/process/server.py)
            answers = before, await client.is_server_ready(), await client.is_server_live()
            await client.close()
        await services.repository.close()
        return answers

    assert asyncio.run(scenario()) == (True, False, True)
