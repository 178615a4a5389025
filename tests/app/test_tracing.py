"""Traces and request ids: the real app and the real batcher, spans caught by the SDK's in-memory
exporter; the caller's traceparent continued, one trace per request with its steps in order, and
a batch linked to every request it served."""

import asyncio
import shutil
from functools import partial

import pytest
import tritonclient.grpc as triton_grpc
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image

from app import tracing
from app.config import Settings
from app.grpc.server import serving
from app.http.app import create_app
from app.serving import preprocess
from app.serving import services as wiring

from ..conftest import MODELS, free_port, png_bytes, wait_loaded
from .test_batching import Gate, batcher, hold_worker, lenet  # noqa: F401 (lenet is a fixture)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(scope="module")
def exporter():
    caught = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(caught))
    tracing.use(provider)
    yield caught
    tracing.use(None)


@pytest.fixture(scope="module")
def traced(exporter, tmp_path_factory):
    """The app (HTTP, and gRPC in the same event loop) over LeNet-5 and the kernels, tracing on."""
    repository = tmp_path_factory.mktemp("models")
    for name in ("lenet5", "kernels"):
        shutil.copytree(MODELS / name, repository / name)
    settings = Settings(models_dir=repository, default_model="lenet5", grpc_port=free_port())
    services = wiring.build(settings)
    app = create_app(services=services, companion=partial(serving, services))
    with TestClient(app) as client:
        wait_loaded(client)
        yield client, services


def request_spans(exporter: InMemorySpanExporter, trace_id: int):
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    (server,) = [s for s in spans if s.kind == trace.SpanKind.SERVER]
    children = sorted((s for s in spans if s.parent and s.parent.span_id == server.context.span_id), key=start_end)
    return server, children


def start_end(span) -> tuple[int, int]:
    return span.start_time, span.end_time


def lenet_png(photos) -> bytes:
    return png_bytes(Image.open(photos["chelsea"]).convert("L").resize((28, 28)))


def test_an_http_request_continues_the_callers_trace_with_its_steps_in_order(traced, exporter, photos):
    client, _ = traced
    exporter.clear()
    headers = {"content-type": "image/png", "traceparent": TRACEPARENT}
    assert client.post("/classify?model=lenet5", content=lenet_png(photos), headers=headers).status_code == 200
    server, children = request_spans(exporter, int(TRACE_ID, 16))
    assert server.parent.span_id == int(PARENT_ID, 16)
    assert [s.name for s in children] == ["decode", "queue", "inference", "postprocess"]
    assert children[2].attributes["cnnserve.provider"] == "CPUExecutionProvider"
    assert children[2].attributes["cnnserve.batch.size"] == 1


def test_an_image_decoded_by_the_models_worker_is_decoded_after_its_queue(traced, exporter, photos):
    client, services = traced
    exporter.clear()
    headers = {"content-type": "image/png", "traceparent": TRACEPARENT}
    assert client.post("/classify?model=kernels", content=photos["chelsea"].read_bytes(), headers=headers).is_success
    _, children = request_spans(exporter, int(TRACE_ID, 16))
    if services.repository.get("kernels").plan.decode == "worker":
        assert [s.name for s in children] == ["queue", "decode", "inference", "postprocess"]
    else:
        assert [s.name for s in children] == ["decode", "queue", "inference", "postprocess"]


def test_each_request_without_a_traceparent_is_a_trace_of_its_own(traced, exporter, photos):
    client, _ = traced
    exporter.clear()
    for _ in range(2):
        client.post("/classify?model=lenet5", content=lenet_png(photos), headers={"content-type": "image/png"})
    servers = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert len(servers) == 2 and servers[0].context.trace_id != servers[1].context.trace_id
    assert all(s.parent is None for s in servers)


def test_the_batch_is_a_trace_of_its_own_linked_both_ways_with_the_request(traced, exporter, photos):
    client, _ = traced
    exporter.clear()
    headers = {"content-type": "image/png", "traceparent": TRACEPARENT}
    client.post("/classify?model=lenet5", content=lenet_png(photos), headers=headers)
    server, children = request_spans(exporter, int(TRACE_ID, 16))
    (batch,) = [s for s in exporter.get_finished_spans() if s.name == "batch"]
    assert batch.context.trace_id != server.context.trace_id and batch.parent is None
    assert [link.context.span_id for link in batch.links] == [server.context.span_id]
    (inference,) = [s for s in children if s.name == "inference"]
    assert [link.context.span_id for link in inference.links] == [batch.context.span_id]


def test_a_grpc_call_continues_the_callers_trace(traced, exporter, photos):
    _, services = traced
    exporter.clear()
    spec = services.repository.get("kernels").spec.input
    image = preprocess.prepare(photos["chelsea"].read_bytes(), spec, 50_000_000)
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{services.settings.grpc_port}")
    given = triton_grpc.InferInput("input", list(image.shape), "FP32")
    given.set_data_from_numpy(image)
    client.infer("kernels", [given], headers={"traceparent": TRACEPARENT})
    client.close()
    server, children = request_spans(exporter, int(TRACE_ID, 16))
    assert server.name == "inference.GRPCInferenceService/ModelInfer"
    assert server.parent.span_id == int(PARENT_ID, 16)
    assert [s.name for s in children] == ["decode", "queue", "inference", "postprocess"]


def test_one_batch_serving_several_requests_is_linked_to_each(exporter, lenet):  # noqa: F811
    session, images = lenet
    gate = Gate(session)
    b = batcher(gate)
    tracer = tracing.provider().get_tracer("test")

    async def scenario():
        first = await hold_worker(b, gate, images[:1])
        requests, contexts = [], []
        for i in range(1, 4):  # three requests wait behind the first, each in a span of its own
            with tracer.start_as_current_span(f"request {i}") as span:
                requests.append(b.submit(images[i : i + 1], timeout=10))
                contexts.append(span.get_span_context())
        gate.open.set()
        await asyncio.gather(first, *requests)
        await b.close()
        return contexts

    exporter.clear()
    contexts = asyncio.run(scenario())
    assert gate.sizes == [1, 3]
    (batch,) = [s for s in exporter.get_finished_spans() if s.name == "batch"]
    assert [link.context.span_id for link in batch.links] == [c.span_id for c in contexts]
    assert batch.attributes["cnnserve.batch.size"] == 3 and batch.attributes["cnnserve.batch.requests"] == 3
    for context in contexts:
        steps = [s for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == context.span_id]
        assert sorted(s.name for s in steps) == ["inference", "queue"]


def test_every_answer_carries_the_clients_request_id_or_a_new_one(traced):
    client, _ = traced
    assert client.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32 and made != client.get("/healthz").headers["x-request-id"]
    refused = client.get("/models/no-such-model", headers={"x-request-id": "x" * 500})
    assert refused.status_code == 404 and len(refused.headers["x-request-id"]) == 32


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_traces_are_off_unless_the_standard_variables_ask(environ, wanted):
    assert tracing.wanted(environ) is wanted
