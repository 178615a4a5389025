"""GET /models, /models/{name}, probes and metrics."""

from prometheus_client.parser import text_string_to_metric_families


def test_models_lists_every_served_model_with_its_input_and_accuracy(client):
    body = client.get("/models").json()
    assert body["default_model"] == "efficientnet_lite0"
    models = {m["name"]: m for m in body["models"]}
    assert {"lenet5", "kernels", "efficientnet_lite0"} <= set(models)
    lenet = models["lenet5"]
    assert lenet["status"] == "ready" and lenet["labels"] == 10
    assert lenet["input"]["height"] == 28 and lenet["accuracy"]["samples"] == 10000


def test_model_details_name_the_provider_and_the_hash(client):
    info = client.get("/models/efficientnet_lite0").json()
    assert info["provider"] == "CPUExecutionProvider" and len(info["sha256"]) == 64
    assert info["labels"] == 1000 and info["default"] is True


def test_liveness_answers_without_models(client):
    assert client.get("/healthz").json() == {"status": "alive", "models_loaded": 0, "models_failed": 0}


def test_metrics_count_requests_by_endpoint_model_and_status(client, photos):
    client.post("/classify?model=lenet5", files={"file": photos["chelsea"].read_bytes()})
    client.post("/classify?model=lenet5", content=b"x", headers={"content-type": "image/png"})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    counts = {
        (s.labels["endpoint"], s.labels["model"], s.labels["status"]): s.value
        for s in families["cnnserve_requests"].samples
        if s.name == "cnnserve_requests_total"
    }
    assert counts[("/classify", "lenet5", "200")] >= 1
    assert counts[("/classify", "lenet5", "400")] >= 1
    latency = families["cnnserve_request_duration_seconds"]
    assert any(s.name.endswith("_count") and s.labels["endpoint"] == "/classify" for s in latency.samples)
    loaded = {s.labels["model"]: s.labels["provider"] for s in families["cnnserve_model_loaded"].samples}
    assert loaded["lenet5"] == "CPUExecutionProvider"


def test_openapi_documents_typed_responses(client):
    schema = client.get("/openapi.json").json()
    classify = schema["paths"]["/classify"]["post"]
    assert "multipart/form-data" in classify["requestBody"]["content"]
    assert classify["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("ClassifyResponse")


def test_metrics_follow_prometheus_conventions_and_cover_the_batcher(client, photos):
    client.post("/classify?model=lenet5", files={"file": photos["coffee"].read_bytes()})
    client.post(
        "/v2/models/lenet5/infer",
        json={"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]},
    )
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    kinds = {name: family.type for name, family in families.items() if name.startswith("cnnserve_")}
    assert kinds["cnnserve_requests"] == "counter" and kinds["cnnserve_rejected"] == "counter"
    for name in ("request_duration_seconds", "inference_duration_seconds", "queue_duration_seconds", "batch_size"):
        assert kinds[f"cnnserve_{name}"] == "histogram"
    assert kinds["cnnserve_queue_depth"] == "gauge" and kinds["cnnserve_model_loaded"] == "gauge"
    assert all(not name.endswith("_total") for name in kinds), "the client library adds _total to counters"
    batches = [s for s in families["cnnserve_batch_size"].samples if s.name == "cnnserve_batch_size_count"]
    assert any(s.labels["model"] == "lenet5" and s.value >= 2 for s in batches)
    v2 = [s for s in families["cnnserve_requests"].samples if s.labels.get("endpoint") == "/v2/models/{name}/infer"]
    assert any(s.labels["model"] == "lenet5" and s.labels["status"] == "200" for s in v2)


def test_a_request_is_counted_before_its_last_byte_leaves(repo_copy, photos):
    """Counted after the send, a client could read its answer and scrape /metrics (from another
    server process) before the count existed: a test of 60 requests once saw 59."""
    import asyncio

    from app.config import Settings
    from app.http.middleware.metrics import RequestMetrics
    from app.serving import services as wiring

    services = wiring.build(Settings(models_dir=repo_copy, default_model="lenet5"))
    services.repository.load_all()

    async def answer(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    counted_when_sent = []

    async def send(message):
        if message["type"] == "http.response.body":
            labels = {"endpoint": "unmatched", "model": "lenet5", "status": "200", "protocol": "http"}
            counted_when_sent.append(services.metrics.registry.get_sample_value("cnnserve_requests_total", labels))

    scope = {"type": "http", "path": "/x", "query_string": b"model=lenet5", "headers": []}
    asyncio.run(RequestMetrics(answer, services)(scope, None, send))
    assert counted_when_sent == [None, 1.0]  # not at the first chunk, already at the last


def test_a_model_the_service_does_not_serve_never_becomes_a_label(client, photos):
    client.post("/classify?model=no-such-model", files={"file": photos["chelsea"].read_bytes()})
    metrics = client.get("/metrics").text
    assert 'model="no-such-model"' not in metrics
    assert 'cnnserve_requests_total{endpoint="/classify",model="",protocol="http",status="404"}' in metrics
