"""cnnserve on Ray Serve, on a real two-node Ray cluster on this machine.

Two Ray nodes (a head and a worker, each a raylet of its own with one CPU and a custom resource that
names it), the application deployed as `cnnserve ray` deploys it: every model a deployment that
autoscales from 1 to 2 replicas, at most one replica of a model on a node, the ingress on the head.
The native answers come from the app `cnnserve serve` runs, built in this process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the Ray path needs cnnserve[ray]")

from fastapi.testclient import TestClient  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from app.config import Settings  # noqa: E402
from app.rayserve.app import APP_NAME, THROUGHPUT_OPTIMIZED  # noqa: E402
from tests.conftest import MODELS, ROOT, free_port, running_client  # noqa: E402

pytestmark = pytest.mark.slow
MODEL_NAMES = ("efficientnet_lite0", "lenet5")
QUEUE = 4  # small bounds, so that a flood meets them


@dataclass
class RayService:
    cluster: Cluster
    worker: object  # the worker node, removed by the last test
    url: str

    def replicas(self, model: str) -> int:
        """Running replicas of ``model``'s deployment, as Ray Serve reports them."""
        deployment = serve.status().applications[APP_NAME].deployments[model]
        return deployment.replica_states.get("RUNNING", 0)


COMMAND = [
    sys.executable, "-m", "app", "ray",
    "--models-dir", str(MODELS),
    *("--load-model", MODEL_NAMES[0], "--load-model", MODEL_NAMES[1]),
    *("--replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "1"),
    *("--replica-cpus", "0.5", "--max-replicas-per-node", "1"),
    *("--ingress-resources", '{"head": 0.01}', "--proxy-location", "HeadOnly"),
]  # fmt: skip
ENVIRONMENT = {
    "CNNSERVE_MAX_QUEUE": str(QUEUE),
    "CNNSERVE_RAY_UPSCALE_DELAY_S": "1",
    "CNNSERVE_RAY_DOWNSCALE_DELAY_S": "3",
    # replicas and handles report their requests in flight every second, not every 10 (Ray's default)
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    **THROUGHPUT_OPTIMIZED,  # what `cnnserve ray` runs in; a cluster it joins is given it at start, as here
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",  # an ingress stopping waits 1 s for HAProxy, not 30
}


@pytest.fixture(scope="module")
def ray_service() -> Iterator[RayService]:
    """The cluster, then `cnnserve ray` joining it, as a user starts it (the nodes started here
    inherit the environment, so the replicas report their load every second)."""
    with pytest.MonkeyPatch.context() as environment:
        for name, value in ENVIRONMENT.items():
            environment.setenv(name, value)
        yield from started_service()


def started_service() -> Iterator[RayService]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False},
    )
    worker = cluster.add_node(num_cpus=1, resources={"worker": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    port = free_port()
    command = [*COMMAND, "--address", cluster.address, "--port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: bool(announced(log)) or server.poll() is not None, 180, "cnnserve ray serving")
            assert server.poll() is None, announced(log, everything=True)
            yield RayService(cluster, worker, f"http://127.0.0.1:{port}")
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
            ray.shutdown()
            cluster.shutdown()


def announced(log: IO[str], everything: bool = False) -> str:
    """The line `cnnserve ray` prints once it serves (or all it printed)."""
    log.seek(0)
    text = log.read()
    return text if everything else next((line for line in text.splitlines() if "cnnserve on Ray Serve" in line), "")


@pytest.fixture(scope="module")
def native() -> Iterator[TestClient]:
    with running_client(Settings(models_dir=MODELS, load_models=",".join(MODEL_NAMES), model_control="explicit")) as c:
        yield c


def classify(client: httpx.Client, photo: Path, model: str) -> httpx.Response:
    return client.post(f"/classify?model={model}", files={"file": photo.read_bytes()})


def test_both_nodes_are_in_the_cluster(ray_service: RayService) -> None:
    alive = [node for node in ray.nodes() if node["Alive"]]
    assert sorted(r for node in alive for r in node["Resources"] if r in ("head", "worker")) == ["head", "worker"]


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_top5_equals_the_native_server(
    ray_service: RayService, native: TestClient, photos: dict[str, Path], model: str
) -> None:
    with httpx.Client(base_url=ray_service.url, timeout=60) as client:
        for photo in photos.values():
            on_ray, served = classify(client, photo, model), classify(native, photo, model)  # type: ignore[arg-type]
            assert on_ray.status_code == served.status_code == 200
            ray_top, native_top = on_ray.json()["predictions"], served.json()["predictions"]
            assert [p["index"] for p in ray_top] == [p["index"] for p in native_top]
            assert [p["score"] for p in ray_top] == pytest.approx([p["score"] for p in native_top], abs=1e-6)


def test_v2_tensor_inference_equals_the_native_server(ray_service: RayService, native: TestClient) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}]}
    signature = native.get("/v2/models/lenet5").json()
    body["inputs"][0]["name"] = signature["inputs"][0]["name"]
    on_ray = httpx.post(f"{ray_service.url}/v2/models/lenet5/infer", json=body, timeout=60)
    served = native.post("/v2/models/lenet5/infer", json=body)
    assert on_ray.status_code == served.status_code == 200
    assert on_ray.json()["outputs"][0]["data"] == pytest.approx(served.json()["outputs"][0]["data"], abs=1e-5)
    assert httpx.get(f"{ray_service.url}/v2/models/lenet5", timeout=10).json() == signature


def test_feature_maps_equal_the_native_server(
    ray_service: RayService, native: TestClient, photos: dict[str, Path]
) -> None:
    path = "/featuremaps?model=lenet5&layer=features.conv1&format=json"
    image = {"file": photos["coffee"].read_bytes()}
    on_ray, served = httpx.post(f"{ray_service.url}{path}", files=image, timeout=60), native.post(path, files=image)
    assert on_ray.status_code == served.status_code == 200
    assert on_ray.json() == served.json()


@pytest.mark.parametrize(
    "path",
    [
        "/explain?model=lenet5&method=occlusion&format=json",
        "/explain?model=lenet5&method=gradcam&format=json",
        "/preprocess?model=lenet5",
        "/explain/input?model=lenet5",
    ],
)
def test_explanations_equal_the_native_server(
    ray_service: RayService, native: TestClient, photos: dict[str, Path], path: str
) -> None:
    image = {"file": photos["coffee"].read_bytes()}
    on_ray, served = httpx.post(f"{ray_service.url}{path}", files=image, timeout=60), native.post(path, files=image)
    assert on_ray.status_code == served.status_code == 200
    assert on_ray.headers["content-type"] == served.headers["content-type"]
    assert on_ray.content == served.content


def test_kernels_equal_the_native_server(ray_service: RayService, native: TestClient) -> None:
    on_ray = httpx.get(f"{ray_service.url}/models/lenet5/kernels?format=json", timeout=30)
    assert on_ray.status_code == 200
    assert on_ray.json() == native.get("/models/lenet5/kernels?format=json").json()


def test_listing_and_readiness_come_from_the_replicas(ray_service: RayService) -> None:
    assert httpx.get(f"{ray_service.url}/readyz", timeout=10).status_code == 200
    listing = httpx.get(f"{ray_service.url}/models", timeout=10).json()
    assert sorted(m["name"] for m in listing["models"]) == sorted(MODEL_NAMES)
    assert all(m["status"] == "ready" and m["provider"] == "CPUExecutionProvider" for m in listing["models"])


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status"),
    [
        ("/classify?model=nope", b"\xff\xd8", "image/jpeg", 404),
        ("/classify?model=lenet5", b"not an image", "image/jpeg", 400),
        ("/classify?model=lenet5&top_k=0", b"\xff\xd8", "image/jpeg", 422),
        ("/classify?model=lenet5", b"text", "text/plain", 415),
        ("/classify?model=lenet5&version=7", b"\xff\xd8", "image/jpeg", 404),
    ],
)
def test_bad_requests_get_the_native_4xx(
    ray_service: RayService, path: str, body: bytes, content_type: str, status: int
) -> None:
    answer = httpx.post(f"{ray_service.url}{path}", content=body, headers={"content-type": content_type}, timeout=30)
    assert answer.status_code == status
    assert "detail" in answer.json()


def test_a_flood_gets_429_with_retry_after_and_the_service_stays_up(
    ray_service: RayService, photos: dict[str, Path]
) -> None:
    big = photos["astronaut"].read_bytes()

    def one(_: int) -> httpx.Response:
        return httpx.post(f"{ray_service.url}/classify", content=big, headers={"content-type": "image/png"}, timeout=60)

    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(one, range(96)))
    statuses = {a.status_code for a in answers}
    assert statuses <= {200, 429}, statuses
    refused = [a for a in answers if a.status_code == 429]
    assert refused, "no request met the bound"
    assert all(int(a.headers["Retry-After"]) >= 1 for a in refused)
    assert httpx.get(f"{ray_service.url}/readyz", timeout=10).status_code == 200


class Load:
    """``clients`` threads classifying in a loop until stopped; each failed request is retried once,
    and a request that fails twice is recorded."""

    def __init__(self, url: str, image: bytes, clients: int) -> None:
        self.url, self.image, self.stopping = url, image, threading.Event()
        self.answered = self.retried = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]

    def attempt(self, client: httpx.Client) -> str | None:
        """None, or why the request failed, after waiting what its Retry-After asks (at most 1 s)."""
        try:
            answer = client.post("/classify?model=efficientnet_lite0", content=self.image, headers=JPEG)
        except httpx.HTTPError as error:
            return type(error).__name__
        if answer.status_code == 200:
            return None
        time.sleep(min(1.0, float(answer.headers.get("Retry-After", 0))))
        return f"{answer.status_code} {answer.text[:120]}"

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stopping.is_set():
                first = self.attempt(client)
                second = self.attempt(client) if first else None
                with self.lock:
                    self.answered += 1
                    self.retried += bool(first)
                    if second:
                        self.failures.append(f"{first}, then {second}")

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()


JPEG = {"content-type": "image/jpeg"}


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:g} s"
        time.sleep(0.25)
    return time.monotonic() - started


def test_autoscaling_adds_a_replica_on_the_other_node_under_load_and_removes_it_after(
    ray_service: RayService, photos: dict[str, Path]
) -> None:
    wait_until(lambda: ray_service.replicas("efficientnet_lite0") == 1, 90, "1 replica before the load")
    with Load(ray_service.url, photos["grace_hopper"].read_bytes(), clients=4) as load:
        wait_until(lambda: ray_service.replicas("efficientnet_lite0") == 2, 90, "scaling up to 2 replicas")
    assert load.failures == [] and load.answered > 0
    wait_until(lambda: ray_service.replicas("efficientnet_lite0") == 1, 90, "scaling back to 1 replica")


def test_a_node_removed_under_load_fails_no_request_after_one_retry(
    ray_service: RayService, photos: dict[str, Path]
) -> None:
    """Runs last: the worker node goes. The load first scales the model to a replica on each node."""
    with Load(ray_service.url, photos["grace_hopper"].read_bytes(), clients=4) as load:
        wait_until(lambda: ray_service.replicas("efficientnet_lite0") == 2, 90, "scaling up to 2 replicas")
        before = load.answered
        ray_service.cluster.remove_node(ray_service.worker)
        wait_until(lambda: load.answered >= before + 40, 90, "40 answers after the node went")
    assert load.failures == []
    assert [n for n in ray.nodes() if n["Alive"] and "worker" in n["Resources"]] == []


def test_the_ingress_forwards_every_request_the_data_plane_takes() -> None:
    """A request method of Service that RemoteService did not forward would reach the ingress's
    empty repository and answer 404 for a model that is served."""
    import inspect

    from app.rayserve.remote import RemoteService
    from app.serving.service import Service

    public = {name for name, member in vars(Service).items() if not name.startswith("_") and callable(member)}
    assert public - set(vars(RemoteService)) == {"model_settings"}  # the replicas' business, never the ingress's
    assert all(inspect.iscoroutinefunction(vars(RemoteService)[n]) for n in ("classify", "infer", "layers"))
