"""grpc.health.v1 beside the Open Inference Protocol (app/grpc/health.py), on a real server process:
SERVING once ready, NOT_FOUND for a service it does not offer, no API key needed, NOT_SERVING while
it drains after SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..conftest import free_port, live_server

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def small(repository: Path) -> dict[str, str]:
    """One server process on two small models: ready in a second."""
    return {"CNNSERVE_MODELS_DIR": str(repository), "CNNSERVE_DEFAULT_MODEL": "lenet5", "CNNSERVE_PROCESSES": "1"}


def check(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status)


@pytest.mark.slow
def test_health_answers_serving_for_the_server_and_the_inference_service_without_a_key(repo_copy):
    port = free_port()
    with live_server(**small(repo_copy), CNNSERVE_GRPC_PORT=str(port), CNNSERVE_API_KEY="secret"):
        assert check(port) == SERVING
        assert check(port, "inference.GRPCInferenceService") == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            check(port, "no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_health_answers_not_serving_while_the_server_drains(repo_copy):
    port = free_port()
    with live_server(**small(repo_copy), CNNSERVE_GRPC_PORT=str(port), CNNSERVE_DRAIN_SECONDS="3") as (_, server):
        assert check(port) == SERVING
        server.send_signal(signal.SIGTERM)
        deadline, seen = time.monotonic() + 2.5, []
        while time.monotonic() < deadline and NOT_SERVING not in seen:
            seen.append(check(port))
            time.sleep(0.1)
        assert NOT_SERVING in seen, seen
        server.wait(timeout=60)
