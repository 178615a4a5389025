"""The GRPCInferenceService's calls, translated to the same service calls as the HTTP V2 routes.

Every call goes through ``Servicer.answer``, which does for gRPC what the HTTP middleware does:
the request id (``x-request-id`` metadata in, the same in the initial metadata out, and in the
call's log lines), the server span continuing the caller's ``traceparent``, the API key (as
``authorization: Bearer KEY`` or ``x-api-key`` metadata; the two server probes stay open, as
/v2/health/* do), ``cnnserve_requests_total{protocol="grpc"}`` and the request latency, and the
one mapping of a ServingError's status to a gRPC code. Only our own faults are INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from app import tracing
from app.grpc import codec
from app.grpc import inference_pb2 as pb
from app.http.app import VERSION
from app.http.routes.repository import check_name, refuse_load_parameters, row
from app.http.routes.v2 import PLATFORM, REPOSITORY_EXTENSION
from app.serving.errors import BadRequest, NotFound, ServingError, Unauthorized
from app.serving.service import Tensors
from app.serving.services import Services

log = logging.getLogger("cnnserve.grpc")

T = TypeVar("T")
SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ["classification"]
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,  # with retry-after in the trailing metadata
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def code_of(error: ServingError) -> Any:
    """The gRPC code for a ServingError's status: a 4xx we did not foresee is still the client's."""
    return CODES.get(error.status, grpc.StatusCode.INVALID_ARGUMENT if error.status < 500 else grpc.StatusCode.INTERNAL)


def first(metadata: Sequence[tuple[str, Any]], key: str) -> str | None:
    return next((str(value) for name, value in metadata if name == key), None)


class Servicer:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.service = services.service
        key = services.settings.api_key
        self.key = key.get_secret_value().encode() if key is not None else None

    async def answer(self, context: Any, method: str, model: str | None, work: Callable[[], Awaitable[T]]) -> T:
        """``work()`` under the request id, span, API key, metrics and error mapping of every call."""
        metadata = tuple((item[0], item[1]) for item in context.invocation_metadata() or ())
        started, code = time.perf_counter(), grpc.StatusCode.OK
        with tracing.request_context(first(metadata, tracing.REQUEST_ID_HEADER)) as request_id:
            await context.send_initial_metadata(((tracing.REQUEST_ID_HEADER, request_id),))
            attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method}
            with tracing.server_span(f"{SERVICE}/{method}", metadata, attributes):
                tracing.annotate("cnnserve.request_id", request_id)
                try:
                    if self.key is not None and method not in OPEN_METHODS:
                        self.authenticate(metadata)
                    return await work()
                except ServingError as error:
                    code = code_of(error)
                    if "Retry-After" in error.headers:
                        context.set_trailing_metadata((("retry-after", error.headers["Retry-After"]),))
                    await context.abort(code, error.message)
                    raise  # abort raises; this keeps the type checker sure of it
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as error:
                    if isinstance(error, grpc.aio.AbortError):
                        raise
                    code = grpc.StatusCode.INTERNAL
                    log.exception("unhandled error in %s", method)
                    await context.abort(code, "internal server error")
                    raise
                finally:
                    self.count(method, model, code, started)

    def authenticate(self, metadata: Sequence[tuple[str, Any]]) -> None:
        presented = first(metadata, "x-api-key")
        if presented is None:
            scheme, _, token = (first(metadata, "authorization") or "").partition(" ")
            presented = token.strip() if scheme.lower() == "bearer" else None
        if presented is None or self.key is None or not hmac.compare_digest(presented.encode(), self.key):
            raise Unauthorized(
                "missing or wrong API key: send metadata 'authorization: Bearer KEY' or 'x-api-key: KEY'"
            )

    def count(self, method: str, model: str | None, code: Any, started: float) -> None:
        metrics, endpoint = self.services.metrics, f"/{SERVICE}/{method}"
        label = model if model and self.service.serves(model) else ""
        metrics.requests.labels(endpoint, label, code.name, "grpc").inc()
        metrics.latency.labels(endpoint, label).observe(time.perf_counter() - started)

    # -- health and metadata ---------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        async def work() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self.answer(context, "ServerLive", None, work)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        async def work() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.service.readiness().ready)

        return await self.answer(context, "ServerReady", None, work)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        async def work() -> pb.ModelReadyResponse:
            try:
                self.service.model_ready(model_name(request.name), request.version or None)
            except ServingError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self.answer(context, "ModelReady", request.name, work)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        async def work() -> pb.ServerMetadataResponse:
            managed = self.services.control.managed
            extensions = [*EXTENSIONS, REPOSITORY_EXTENSION] if managed else EXTENSIONS
            return pb.ServerMetadataResponse(name="cnnserve", version=VERSION, extensions=extensions)

        return await self.answer(context, "ServerMetadata", None, work)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        async def work() -> pb.ModelMetadataResponse:
            signature = self.service.signature(model_name(request.name), request.version or None)
            return codec.metadata(signature, PLATFORM)

        return await self.answer(context, "ModelMetadata", request.name, work)

    # -- inference ---------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        async def tensors() -> Tensors:
            if codec.costly(request):
                return await asyncio.to_thread(codec.input_tensors, request)
            return codec.input_tensors(request)

        async def work() -> pb.ModelInferResponse:
            name = model_name(request.model_name)
            result = await self.service.infer(name, tensors, version=request.model_version or None)
            with tracing.span("postprocess"):
                return codec.response(result, request)

        return await self.answer(context, "ModelInfer", request.model_name, work)

    # -- the model repository extension ------------------------------------------------------

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        async def work() -> pb.RepositoryIndexResponse:
            self.services.control.require_managed()
            entries = await asyncio.to_thread(self.services.repository.index)  # it lists the folder
            rows = [row(entry) for entry in entries if entry.state == "READY" or not request.ready]
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

        return await self.answer(context, "RepositoryIndex", None, work)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        async def work() -> pb.RepositoryModelLoadResponse:
            refuse_load_parameters(dict(request.parameters))
            await self.services.control.load(model_name(request.model_name))
            return pb.RepositoryModelLoadResponse()

        return await self.answer(context, "RepositoryModelLoad", request.model_name, work)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        async def work() -> pb.RepositoryModelUnloadResponse:
            self.services.control.require_managed()
            check_name(request.model_name)
            with contextlib.suppress(NotFound):  # unloading leaves it unloaded either way, as Triton answers
                await self.services.control.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self.answer(context, "RepositoryModelUnload", request.model_name, work)


def model_name(name: str) -> str:
    """The protocol requires a model name: an empty one is not the default model here."""
    if not name:
        raise BadRequest("the request names no model")
    return name
