"""The request bytes a server process's gRPC calls hold are bounded (app/grpc/server.py,
MessageBudget): many large calls at once are refused RESOURCE_EXHAUSTED beyond the budget as soon as
they are read, instead of each holding its message while it waits, and the bytes come back when
calls end."""

from __future__ import annotations

import asyncio
import shutil

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from app.grpc.server import HELD_MESSAGES

from ..conftest import MODELS, free_port, live_server

TENSOR = np.zeros((1, 3, 224, 224), np.float32)
LIMIT = TENSOR.nbytes + 4096  # one tensor per message, so the budget is HELD_MESSAGES of them
CALLS = 6 * HELD_MESSAGES


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(MODELS / "efficientnet_lite0", models / "efficientnet_lite0")
    port = free_port()
    with live_server(
        CNNSERVE_MODELS_DIR=str(models),
        CNNSERVE_DEFAULT_MODEL="efficientnet_lite0",
        CNNSERVE_PROCESSES="1",
        CNNSERVE_GRPC_PORT=str(port),
        CNNSERVE_GRPC_MAX_MESSAGE_BYTES=str(LIMIT),
        CNNSERVE_MAX_QUEUE=str(4 * CALLS),  # admission would take them all: only the budget refuses
    ):
        yield f"127.0.0.1:{port}"


def infer_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="efficientnet_lite0")
    request.inputs.add(name="input", datatype="FP32", shape=list(TENSOR.shape))
    request.raw_input_contents.append(TENSOR.tobytes())
    return request


async def call_all(address: str, count: int) -> list[tuple[grpc.StatusCode, str]]:
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", LIMIT)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def one() -> tuple[grpc.StatusCode, str]:
            try:
                await stub.ModelInfer(infer_request(), timeout=120)
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details() or ""
            return grpc.StatusCode.OK, ""

        return await asyncio.gather(*(one() for _ in range(count)))


def test_calls_beyond_the_message_budget_are_refused_and_the_rest_answered(address):
    outcomes = asyncio.run(call_all(address, CALLS))
    codes = [code for code, _ in outcomes]
    refused = [details for code, details in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert codes.count(grpc.StatusCode.OK) >= HELD_MESSAGES // 2, codes
    assert refused and all("message bytes" in details for details in refused), outcomes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_the_bytes_come_back_when_the_calls_end(address):
    asyncio.run(call_all(address, CALLS))
    outcomes = asyncio.run(call_all(address, HELD_MESSAGES // 2))
    assert {code for code, _ in outcomes} == {grpc.StatusCode.OK}, outcomes
