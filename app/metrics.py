"""Prometheus metrics, on a registry of the app's own (so several apps in one process never clash).
The HTTP middleware that counts requests is app/http/middleware/metrics.py.

When several server processes share the port, prometheus_client's multiprocess mode (its
PROMETHEUS_MULTIPROC_DIR) keeps each process's values in that folder and /metrics, whichever
process answers, adds them all up: a scrape sees the service, not one process of it."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cnnserve_requests",
            "Requests by endpoint, model, status (the HTTP status, or the gRPC code's name) and protocol (http, grpc).",
            ["endpoint", "model", "status", "protocol"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cnnserve_request_duration_seconds",
            "Request latency, receipt to last byte (gRPC calls by their method's path).",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "cnnserve_inference_duration_seconds",
            "Time inside ONNX Runtime per call.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cnnserve_batch_size",
            "Images per ONNX Runtime call made by the dynamic batcher.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "cnnserve_queue_duration_seconds",
            "Time a request waited for its batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "cnnserve_queue_depth",
            "Requests waiting for a batch, per model.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "cnnserve_rejected",
            "Requests refused with 429: the model was at capacity, or its queue was full.",
            ["model"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "cnnserve_dropped",
            "Queued requests dropped unrun: the client had gone or the deadline passed.",
            ["model", "reason"],
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "cnnserve_model_loaded",
            "1 for each model version served, labelled with the execution provider it got; 0 once unloaded.",
            ["model", "version", "provider"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.model_loads = Counter(
            "cnnserve_model_loads",
            "Model loads (at start, by the repository API or by polling), by outcome: loaded, unchanged, refused.",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.model_unloads = Counter(
            "cnnserve_model_unloads",
            "Models unloaded (by the repository API or because their folder went).",
            ["model"],
            registry=self.registry,
        )
        self.model_load_duration = Histogram(
            "cnnserve_model_load_duration_seconds",
            "Seconds to load, check and warm one model version.",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.connections = Gauge(
            "cnnserve_open_connections",
            "Open client connections, per server process (label pid when there are several).",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.rebalanced = Counter(
            "cnnserve_connections_rebalanced",
            "Keep-alive connections asked to reconnect (Connection: close) because their server "
            "process held more than its share.",
            registry=self.registry,
        )
        self.model_failed = Gauge(
            "cnnserve_model_failed",
            "1 for each model that serves nothing because it was refused at load; 0 once it serves.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )

        self.access_refusals = Counter(
            "cnnserve_access_refusals",
            "Requests refused by access control, by reason: missing, unknown, expired, invalid_token, "
            "wrong_audience, not_yet_valid, insufficient_scope, rate_limited, ambiguous, in_url.",
            ["reason"],
            registry=self.registry,
        )
        self.credential_requests = Counter(
            "cnnserve_credential_requests",
            "Requests admitted by access control, by credential name (a key's name; token for bearer tokens).",
            ["credential"],
            registry=self.registry,
        )
        self.header_timeouts = Counter(
            "cnnserve_header_timeouts",
            "Connections closed because their request headers did not arrive within CNNSERVE_HEADER_TIMEOUT_S.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        every_process = CollectorRegistry()
        # prometheus_client leaves MultiProcessCollector.__init__ unannotated
        multiprocess.MultiProcessCollector(every_process, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        return generate_latest(every_process)
