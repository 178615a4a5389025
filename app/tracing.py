"""Request ids and OpenTelemetry traces, for every protocol.

Request ids: each request gets one (the client's ``X-Request-ID`` if it sent a sane one), which its
answer carries back and every log line written while it runs carries too: a context variable, read
by a logging filter (``RequestIdFilter``).

Traces: off unless the standard OpenTelemetry variables ask for them (``OTEL_TRACES_EXPORTER`` or
an ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``; ``OTEL_SDK_DISABLED=true`` wins), exported over OTLP
(gRPC) in batches; the SDK reads the rest (sampler, batch sizes, headers, resource attributes).
Off, every call here returns at its first line and nothing is imported from the SDK: tracing costs
nothing measurable (README, "Traces").

A request's trace: the server span (FastAPI's own for HTTP, ``app/grpc/servicer.py``'s for gRPC,
each continuing the caller's W3C ``traceparent``), then ``decode``, ``queue``, ``inference`` and
``postprocess`` as its children, in that order. A batch that served several requests is one more
span, ``batch``, in a trace of its own, linked to each request's span; each request's
``inference`` span links back to it. The batcher's worker threads have no request context, so a
queued request carries its own (``Waiting``) and the spans of a batch are recorded after it ran,
with the times measured then.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128  # longer client ids are replaced, so that a log line stays a line
INSTRUMENTATION = "cnnserve"

request_id: ContextVar[str | None] = ContextVar("cnnserve_request_id", default=None)
_ID_PREFIX = os.urandom(8).hex()  # per process (a spawned server process imports this anew)
_ID_COUNT = itertools.count()

_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None
_NOTHING = contextlib.nullcontext()


# -- request ids ----------------------------------------------------------------------------


def accept_request_id(given: str | None) -> str:
    """The client's id when it is printable ASCII of at most MAX_REQUEST_ID characters (it goes
    into log lines and headers as it is), else a new one: 32 hex digits, the process's random
    half and a count (a tenth of uuid4's cost, and as unique here)."""
    if given and len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable():
        return given
    return f"{_ID_PREFIX}{next(_ID_COUNT):016x}"


class RequestIdFilter(logging.Filter):
    """Gives every record ``request_id`` (``-`` outside a request) and ``request`` (`` request_id=ID``
    inside one, empty outside), for formats to use."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = request_id.get()
        record.request_id = current or "-"
        record.request = f" request_id={current}" if current else ""
        return True


# -- configuration ----------------------------------------------------------------------------


def enabled() -> bool:
    return _tracer is not None


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for traces. The specification's default exporter is
    OTLP, always on; ours is off until an exporter or an endpoint is named."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return exporter not in ("", "none") or (exporter == "" and bool(endpoint))


def configure_from_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Once per process: a tracer provider with the exporters the environment names, if any."""
    if _provider is None and wanted(environ):
        use(provider_from(environ))


def provider_from(environ: Mapping[str, str]) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "cnnserve"}))
    provider = TracerProvider(resource=resource)
    for name in (environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(","):
        exporter: SpanExporter
        if name.strip() == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol not in (None, "grpc"):
                raise ValueError(f"OTLP protocol {protocol!r}: cnnserve exports traces over grpc only")
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        elif name.strip() == "console":
            exporter = ConsoleSpanExporter()
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER {name!r}: cnnserve knows otlp, console and none")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def use(provider: TracerProvider | None) -> None:
    """Trace through ``provider`` from now on (None: stop tracing). Tests hand one with an
    in-memory exporter; the server process, the one the environment asks for."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else None


def provider() -> TracerProvider | None:
    return _provider


def shutdown() -> None:
    """Exports what is still buffered, at the end of the process."""
    if _provider is not None:
        _provider.shutdown()


# -- spans ------------------------------------------------------------------------------------


def span(name: str, attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
    """A child of the current span for the block, or nothing at all when tracing is off."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(name, attributes=attributes)


def server_span(
    name: str, carrier: Iterable[tuple[str, str]], attributes: Mapping[str, Any]
) -> contextlib.AbstractContextManager[Any]:
    """A request's server span, continuing the caller's ``traceparent`` found in ``carrier``
    (gRPC metadata)."""
    if _tracer is None:
        return _NOTHING
    parent = propagate.extract({key: value for key, value in carrier})
    return _tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)


def annotate(key: str, value: str) -> None:
    """An attribute on the current span, when there is one being recorded."""
    if _tracer is not None:
        trace.get_current_span().set_attribute(key, value)


def now() -> int:
    """A timestamp for a span recorded later (0 when tracing is off: nothing will be recorded)."""
    return time.time_ns() if _tracer is not None else 0


def record(name: str, started: int, attributes: Mapping[str, Any] | None = None) -> None:
    """A child of the current span that began at ``started`` (from ``now()``) and ends now."""
    if _tracer is not None and started:
        _tracer.start_span(name, start_time=started, attributes=attributes).end()


@dataclass(frozen=True)
class Waiting:
    """A request's trace while it waits in a batcher: its context and when it was queued."""

    context: otel_context.Context
    queued: int


def waiting() -> Waiting | None:
    """The current request's trace, for a batcher to record its steps in (None outside a trace)."""
    if _tracer is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    return Waiting(otel_context.get_current(), time.time_ns())


@dataclass(frozen=True)
class BatchTimes:
    """When a batch was taken from the queue, when its images were decoded, when it ran and ended."""

    taken: int
    decoded: int
    ended: int


def record_batch(
    model: str, provider: str, images: int, requests: list[tuple[Waiting | None, bool]], times: BatchTimes
) -> None:
    """After a batch ran (on a worker thread or the event loop): the batch span in a trace of its
    own, linked to each request's span, and in each request's trace its queue wait, its decoding
    when the worker did it (``requests`` pairs each request's trace with that), and its inference."""
    traced = [(w, decoded_here) for w, decoded_here in requests if w is not None]
    if _tracer is None or not traced:
        return
    links = [trace.Link(trace.get_current_span(w.context).get_span_context()) for w, _ in traced]
    attributes: dict[str, str | int] = {
        "cnnserve.model": model,
        "cnnserve.provider": provider,
        "cnnserve.batch.size": images,
        "cnnserve.batch.requests": len(requests),
    }
    batch = _tracer.start_span(
        "batch", context=otel_context.Context(), links=links, start_time=times.decoded, attributes=attributes
    )
    batch.end(end_time=times.ended)
    back = [trace.Link(batch.get_span_context())]
    for w, decoded_here in traced:
        _tracer.start_span("queue", context=w.context, start_time=min(w.queued, times.taken)).end(end_time=times.taken)
        if decoded_here:
            _tracer.start_span("decode", context=w.context, start_time=times.taken).end(end_time=times.decoded)
        inference = _tracer.start_span(
            "inference", context=w.context, links=back, start_time=times.decoded, attributes=attributes
        )
        inference.end(end_time=times.ended)


@contextlib.contextmanager
def request_context(given: str | None) -> Iterator[str]:
    """The request's id, accepted or made, set for the log lines written inside the block."""
    current = accept_request_id(given)
    token = request_id.set(current)
    try:
        yield current
    finally:
        request_id.reset(token)
