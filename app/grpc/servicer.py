"""The GRPCInferenceService's calls, translated to the same service calls as the HTTP V2 routes.

Every call goes through ``Servicer.answer``, which does for gRPC what the HTTP middleware does:
the request id (``x-request-id`` metadata in, the same in the initial metadata out, and in the
call's log lines), the server span continuing the caller's ``traceparent``, access control (the
credential as ``authorization: Bearer KEY_OR_TOKEN`` or ``x-api-key`` metadata, once; the scope
each method needs in METHOD_SCOPES, the same as its HTTP path's; the two server probes stay open,
as /v2/health/* do; app/serving/access.py decides), ``cnnserve_requests_total{protocol="grpc"}``
and the request latency, and the one mapping of a ServingError's status to a gRPC code. Only our
own faults are INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from app.serving.access import OPEN, Access
from app.serving.errors import BadRequest, NotFound, ServingError, Unauthorized
from app.serving.service import Tensors
from app.serving.services import Services

log = logging.getLogger("cnnserve.grpc")

T = TypeVar("T")
SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ["classification"]
METHOD_SCOPES = {
    "ServerLive": OPEN,
    "ServerReady": OPEN,
    "ModelReady": "read",
    "ServerMetadata": "read",
    "ModelMetadata": "read",
    "ModelInfer": "infer",
    "RepositoryIndex": "admin",
    "RepositoryModelLoad": "admin",
    "RepositoryModelUnload": "admin",
}
CREDENTIAL_KEYS = ("authorization", "x-api-key")
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
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
        self.access = services.access or Access(services.settings, services.metrics)

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
                    self.admit(method, metadata, context)
                    return await work()
                except ServingError as error:
                    code = code_of(error)
                    trailing = [
                        (name.lower(), value) for name, value in error.headers.items() if name != "WWW-Authenticate"
                    ]
                    if trailing:
                        context.set_trailing_metadata(tuple(trailing))
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

    def admit(self, method: str, metadata: Sequence[tuple[str, Any]], context: Any) -> None:
        """Access control for one call: the scope its method needs, of the one credential it presents."""
        needed = METHOD_SCOPES[method]
        if needed == OPEN or not (self.access.enabled or self.access.default_limit):
            return
        client = peer_address(context.peer() or "-")
        try:
            secret = presented(metadata) if self.access.enabled else None
        except Unauthorized as refusal:
            self.access.refused(refusal, None, client, method)
            raise
        self.access.admit(secret, needed, client, method)

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


def presented(metadata: Sequence[tuple[str, Any]]) -> str | None:
    """The one credential in the metadata (gRPC lower-cases keys), or None; two are ambiguous."""
    found = [(name, str(value)) for name, value in metadata if name in CREDENTIAL_KEYS]
    if len(found) > 1:
        raise Unauthorized("send one credential: one authorization or one x-api-key entry", "ambiguous")
    if not found:
        return None
    name, value = found[0]
    if name == "x-api-key":
        return value.strip()
    kind, _, secret = value.strip().partition(" ")
    if kind.lower() != "bearer" or not secret.strip():
        raise Unauthorized("authorization metadata takes 'Bearer KEY_OR_TOKEN'", "unknown")
    return secret.strip()


def peer_address(peer: str) -> str:
    """The client's address from gRPC's peer string (``ipv4:127.0.0.1:5555``, ``ipv6:[::1]:5555``)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return rest.rpartition(":")[0] if kind == "ipv4" else peer


def model_name(name: str) -> str:
    """The protocol requires a model name: an empty one is not the default model here."""
    if not name:
        raise BadRequest("the request names no model")
    return name
