"""The Open Inference Protocol, spoken by NVIDIA's own client (tritonclient[http]) to a real server,
and its errors in Triton's shape."""

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from app.serving import preprocess as imaging
from app.serving.spec import ModelSpec

from ..conftest import MODELS

EFFICIENTNET = ModelSpec.model_validate_json((MODELS / "efficientnet_lite0" / "model.json").read_text())


@pytest.fixture(scope="module")
def triton_client(live_url):
    client = triton.InferenceServerClient(url=live_url.removeprefix("http://"))
    yield client
    client.close()


def tensor(path) -> np.ndarray:
    """The photo preprocessed exactly as /classify does it."""
    return imaging.prepare(path.read_bytes(), EFFICIENTNET.input, 50_000_000)


def classify(url: str, path, k: int = 5) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/classify?model=efficientnet_lite0&top_k={k}",
        data=path.read_bytes(),
        headers={"content-type": "image/png"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["predictions"]


def infer(client, batch: np.ndarray, binary: bool, class_count: int = 0):
    given = triton.InferInput("input", list(batch.shape), "FP32")
    given.set_data_from_numpy(batch, binary_data=binary)
    wanted = triton.InferRequestedOutput("logits", binary_data=binary, class_count=class_count)
    return client.infer("efficientnet_lite0", [given], outputs=[wanted], request_id="photo-1")


def test_tritonclient_sees_a_live_and_ready_server(triton_client):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("efficientnet_lite0")
    assert not triton_client.is_model_ready("no_such_model")


def test_server_metadata_names_the_extensions(triton_client):
    metadata = triton_client.get_server_metadata()
    assert metadata["name"] == "cnnserve"
    assert {"classification", "binary_tensor_data"} <= set(metadata["extensions"])


def test_model_metadata_gives_tensor_names_types_and_a_dynamic_batch(triton_client):
    metadata = triton_client.get_model_metadata("efficientnet_lite0")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    assert metadata["versions"] == ["1"]


def test_model_config_describes_batching(triton_client):
    config = triton_client.get_model_config("lenet5")
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}]
    assert config["max_batch_size"] >= 8


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_top5_equals_classify_on_the_same_photo(live_url, triton_client, photos, binary):
    result = infer(triton_client, tensor(photos["chelsea"]), binary)
    logits = result.as_numpy("logits")
    served = classify(live_url, photos["chelsea"])
    assert logits.shape == (1, 1000)
    assert list(np.argsort(-logits[0])[:5]) == [p["index"] for p in served]
    assert result.get_response()["id"] == "photo-1"


def test_classification_extension_gives_value_index_label(live_url, triton_client, photos):
    result = infer(triton_client, tensor(photos["coffee"]), binary=True, class_count=5)
    rows = result.as_numpy("logits")
    served = classify(live_url, photos["coffee"])
    entries = [entry.decode().split(":", 2) for entry in rows[0]]
    assert [(int(index), label) for _, index, label in entries] == [(p["index"], p["label"]) for p in served]
    assert "espresso" in entries[0][2]


def test_a_batch_of_photos_gives_each_its_own_row(triton_client, photos):
    batch = np.concatenate([tensor(photos["chelsea"]), tensor(photos["coffee"])])
    together = infer(triton_client, batch, binary=True).as_numpy("logits")
    alone = infer(triton_client, batch[1:], binary=True).as_numpy("logits")
    assert np.allclose(together[1], alone[0], atol=1e-4)


def test_a_wrong_shape_is_refused_with_the_shape_the_model_takes(triton_client):
    with pytest.raises(InferenceServerException, match=r"the model takes \[-1, 3, 224, 224\]"):
        infer(triton_client, np.zeros((1, 3, 32, 32), np.float32), binary=True)


def test_errors_come_as_triton_error_bodies(client):
    unknown = client.get("/v2/models/nope")
    assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "INT64", "data": [0] * 784}]}
    wrong_type = client.post("/v2/models/lenet5/infer", json=body)
    assert wrong_type.status_code == 400 and "FP32" in wrong_type.json()["error"]
    not_json = client.post("/v2/models/lenet5/infer", content=b"{not json")
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]
    bad_version = client.get("/v2/models/lenet5/versions/7/ready")
    assert bad_version.status_code == 404


def test_binary_sizes_that_lie_are_refused(client):
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "parameters": {"binary_data_size": 3136}}
            ]
        }
    ).encode()
    short = client.post(
        "/v2/models/lenet5/infer",
        content=header + b"\0" * 100,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert short.status_code == 400 and "binary_data_size" in short.json()["error"]
    too_long = client.post(
        "/v2/models/lenet5/infer", content=header, headers={"Inference-Header-Content-Length": "99999"}
    )
    assert too_long.status_code == 400


@pytest.mark.parametrize(
    ("shape", "outputs"),
    [
        ([-3, 1, 28, 28], None),
        ([0, 1, 28, 28], None),
        ([1, 1, 28, 28], [{"name": "logits", "parameters": {"classification": "five"}}]),
        ([1, 1, 28, 28], [{"name": "probabilities"}]),
    ],
    ids=["negative batch", "empty batch", "classification not a number", "unknown output"],
)
def test_nonsense_requests_are_400_not_500(client, shape, outputs):
    tensor = {"name": "input", "shape": shape, "datatype": "FP32", "data": [0.0] * 784}
    response = client.post("/v2/models/lenet5/infer", json={"inputs": [tensor], "outputs": outputs})
    assert response.status_code == 400 and response.json()["error"]
