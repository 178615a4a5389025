"""The standard gRPC health service, grpc.health.v1.Health, beside the inference service: what
Kubernetes' native gRPC probes (and grpc_health_probe) call.

Check answers from the same readiness as /readyz and ServerReady: SERVING once the default model is
loaded, NOT_SERVING while models load and while the process drains after SIGTERM. The service
names asked about are "" (the server as a whole) and inference.GRPCInferenceService; any other is
NOT_FOUND, as the protocol says. Like the probes over HTTP, it needs no API key. Watch is not
offered (UNIMPLEMENTED, which clients read as "poll Check instead").
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.grpc.servicer import SERVICE
from app.serving.services import Services

SERVICE_NAMES = frozenset({"", SERVICE})


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self, services: Services) -> None:
        self.services = services

    async def Check(self, request: Any, context: Any) -> Any:
        if request.service not in SERVICE_NAMES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        ready = self.services.service.readiness().ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def add_health(server: Any, services: Services) -> None:
    """grpc.health.v1.Health on ``server``, answering for ``services``."""
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(services), server)
