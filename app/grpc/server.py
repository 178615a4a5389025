"""The gRPC server of one server process: grpc.aio in uvicorn's event loop, so that its calls reach
the same service, batchers and admission as the HTTP requests, with no second loop or thread.

``serving(services, processes)`` is entered by the HTTP app's lifespan (app/process/server.py hands
it over): the port is bound at start-up, so a port that cannot be had fails the process's start as
a taken HTTP port does, and calls are answered as the HTTP ones are (ServerReady false while the
models load or the process drains). Several server processes each bind the port with SO_REUSEPORT
and the kernel spreads the connections; a lone process binds it alone, so that a second server on
the same port fails instead of sharing it. At shutdown, calls in flight get GRACE_SECONDS to
finish, new ones are refused.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from app.config import Settings
from app.grpc import inference_pb2 as pb
from app.grpc.health import add_health
from app.grpc.servicer import SERVICE, Servicer
from app.process.tls import CertificateFiles, Pair
from app.serving.services import Services

log = logging.getLogger("cnnserve")

GRACE_SECONDS = 30.0
MAX_CONCURRENT_RPCS = 256  # calls in flight per process; beyond, RESOURCE_EXHAUSTED (each may hold a message)


HELD_MESSAGES = 8  # messages of the largest size this process holds at once; beyond, RESOURCE_EXHAUSTED


@dataclass
class Held:
    """A request message and the bytes it came in, counted against the process's budget until its
    call ends; ``message`` is None for one refused because the budget was spent."""

    message: Any
    size: int


@dataclass
class MessageBudget:
    """The request bytes this process's calls hold, bounded: grpc.aio reads a call's message whole
    before the call starts, and then it waits for admission like any other, so 256 calls of 20
    MiB could hold 5 GiB in one process. A message that would take the held bytes past the budget
    is dropped as soon as it is read and its call refused RESOURCE_EXHAUSTED, with Retry-After."""

    limit: int
    held: int = 0

    def reader(self, parse: Callable[[bytes], Any]) -> Callable[[bytes], Held]:
        def read(data: bytes) -> Held:
            if self.held + len(data) > self.limit:
                return Held(None, 0)
            self.held += len(data)
            return Held(parse(data), len(data))

        return read

    def call(self, method: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Held, Any], Awaitable[Any]]:
        async def bounded(held: Held, context: Any) -> Any:
            if held.message is None:
                context.set_trailing_metadata((("retry-after", "1"),))
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "this process holds all the message bytes it may"
                )
            try:
                return await method(held.message, context)
            finally:
                self.held -= held.size

        return bounded


def handlers(servicer: Servicer, budget: MessageBudget) -> grpc.GenericRpcHandler:
    """The service's methods from the .proto's descriptor, each to the servicer's method of that
    name, its request counted against ``budget`` while the call lasts."""
    methods = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        methods[method.name] = grpc.unary_unary_rpc_method_handler(
            budget.call(getattr(servicer, method.name)),
            request_deserializer=budget.reader(request.FromString),
            response_serializer=response.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(server: grpc.aio.Server, settings: Settings) -> int:
    """The port, over TLS with CNNSERVE_TLS_CERT and _KEY (client certificates signed by
    CNNSERVE_TLS_CLIENT_CA required when it is set), else in clear. The files are read again when
    they change (app/process/tls.py): gRPC asks before each new connection's handshake."""
    where = address(settings.host, settings.grpc_port)
    if settings.tls_cert is None or settings.tls_key is None:
        return int(server.add_insecure_port(where))
    files = CertificateFiles(settings)

    def renewed() -> grpc.ServerCertificateConfiguration | None:
        pair = files.renewed()
        return certificate_configuration(pair) if pair is not None else None

    credentials = grpc.dynamic_ssl_server_credentials(
        certificate_configuration(files.read()), renewed, require_client_authentication=files.client_ca is not None
    )
    return int(server.add_secure_port(where, credentials))


def certificate_configuration(pair: Pair) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(pair.key, pair.certificate)], root_certificates=pair.client_ca)


@asynccontextmanager
async def serving(services: Services, processes: int = 1) -> AsyncIterator[int]:
    """The gRPC server on CNNSERVE_GRPC_PORT for the block (nothing when it is 0); yields the
    port it bound."""
    settings = services.settings
    if settings.grpc_port == 0:
        yield 0
        return
    limit = settings.grpc_message_limit
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 1 if processes > 1 else 0),
        ],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    budget = MessageBudget(HELD_MESSAGES * limit)
    server.add_generic_rpc_handlers((handlers(Servicer(services), budget),))
    add_health(server, services)  # grpc.health.v1, for Kubernetes' gRPC probes
    try:
        port = bind(server, settings)
    except RuntimeError as error:
        raise RuntimeError(f"cannot listen for gRPC on {address(settings.host, settings.grpc_port)}: {error}") from None
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s, messages up to %d bytes", address(settings.host, port), limit)
    try:
        yield port
    finally:
        await server.stop(GRACE_SECONDS)
