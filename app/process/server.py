"""One server process (uvicorn, draining on SIGTERM), or several under the supervisor.

The settings and the process count travel to each child as arguments; the one thing that goes
through the environment is PROMETHEUS_MULTIPROC_DIR, because prometheus_client reads it when it is
imported, before any of our code runs in the child.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from app import sizing, tracing
from app.config import Settings
from app.grpc.server import serving as serving_grpc
from app.http.app import configure_logging, create_app
from app.process.connection import connection_class
from app.process.inference import make_feed, run_owner
from app.process.supervisor import Supervisor
from app.process.tls import CertificateFiles, HttpsCertificates
from app.process.topology import ConnectionShare, Slot, listening_sockets
from app.serving import services as wiring
from app.serving.activity import Activity
from app.serving.control import Shared
from app.serving.feed import Feed, FeedClient, OwnerEnds
from app.serving.runtime import accelerated
from app.serving.services import Services

log = logging.getLogger("cnnserve")

GRACEFUL_SHUTDOWN_SECONDS = 30


class Precedence:
    """The event loop's thread before the others (CNNSERVE_WORKER_NICE): every thread of this
    process but the loop's (the batchers' workers, the decoding pool, ONNX Runtime's own) runs at
    that nice value, checked every tick for new ones. The loop answers probes, refusals and
    admissions, microseconds each; with the same weight as the threads that decode and infer, it
    waits behind them in a flood (README "Access control" has the figures). Linux only: a thread's
    nice value is its own there."""

    def __init__(self, nice: int) -> None:
        self.nice = nice
        self.done: set[int] = {threading.get_native_id()}

    def apply(self) -> None:
        try:
            threads = {int(name) for name in os.listdir("/proc/self/task")}
        except OSError:
            return
        for thread in threads - self.done:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, thread, self.nice)
        self.done = (self.done & threads) | threads


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT turns /readyz to 503 and keeps serving for
    CNNSERVE_DRAIN_SECONDS (so a load balancer stops sending), then shuts down gracefully:
    requests in flight finish before the process exits. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, services: Services, share: ConnectionShare | None = None) -> None:
        super().__init__(config)
        self.services = services
        self.share = share
        nice = services.settings.worker_nice
        self.precedence = Precedence(nice) if nice > 0 else None
        self.https = https_certificates(config, services.settings)
        if share is not None:
            share.connections = self.server_state.connections

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s: this process's open connections, for /metrics and for the other processes."""
        self.services.metrics.connections.set(len(self.server_state.connections))
        if self.share is not None:
            self.share.publish()
        if self.precedence is not None:
            self.precedence.apply()
        if self.https is not None:
            self.https.refresh()  # a renewed certificate, served without a restart
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.https is not None and self.config.ssl is not None:
            self.https.attach(self.config.ssl)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        lifecycle = self.services.lifecycle
        already, lifecycle.draining = lifecycle.draining, True
        drain = self.services.settings.drain_seconds
        if already or drain <= 0:
            super().handle_exit(sig, frame)
        else:
            threading.Timer(drain, super().handle_exit, (sig, frame)).start()


def run_server(
    settings: Settings,
    processes: int = 1,
    sockets: list[socket.socket] | None = None,
    slot: Slot | None = None,
    replacing: bool = False,
    *,
    buckets: Path | None = None,
) -> None:
    """One server process; one of ``processes`` when the supervisor gives it a ``slot`` in the
    counts they share (connections, requests in flight) and the file of rate-limit ``buckets``. A
    process ``replacing`` one that died loads its models before it accepts a connection
    (app/http/app.py, ``lifespan_of``)."""
    activity = Activity(slot.requests, slot.index) if slot is not None else None
    shared = None
    if slot is not None and slot.models_state is not None:
        shared = Shared(slot.models_state, slot.models_applied, slot.index)
    feed = FeedClient(slot.lane) if slot is not None and slot.lane is not None else None
    services = wiring.build(settings, processes, activity, shared, buckets, feed=feed)
    share = ConnectionShare(slot.connections, slot.index) if slot is not None else None
    grpc = partial(serving_grpc, services, processes)  # in the same event loop, on CNNSERVE_GRPC_PORT
    crowded = share.crowded if share else None
    app = create_app(services=services, crowded=crowded, load_first=replacing, companion=grpc)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=uvicorn_logging(),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        http=connection_class(settings.header_timeout_s, services.metrics),
        **tls_options(settings),
    )
    server = DrainingServer(config, services, share)
    server.run(sockets)
    tracing.shutdown()  # what is still buffered is exported before the process ends
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS options: HTTPS with CNNSERVE_TLS_CERT and _KEY, client certificates signed by
    CNNSERVE_TLS_CLIENT_CA required (mTLS) when it is set."""
    if settings.tls_cert is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_client_ca is not None:
        options |= {"ssl_ca_certs": str(settings.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def https_certificates(config: uvicorn.Config, settings: Settings) -> HttpsCertificates | None:
    """What switches HTTPS to a renewed certificate: new contexts made as uvicorn made the first."""
    if settings.tls_cert is None or config.ssl_certfile is None:
        return None
    make = partial(
        uvicorn.config.create_ssl_context,
        config.ssl_certfile,
        config.ssl_keyfile,
        config.ssl_keyfile_password,
        config.ssl_version,
        config.ssl_cert_reqs,
        config.ssl_ca_certs,
        config.ssl_ciphers,
    )
    return HttpsCertificates(CertificateFiles(settings), make)


def uvicorn_logging() -> dict[str, Any]:
    """uvicorn's logging, with each request's id at the end of its access line (app/tracing.py)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": "app.tracing.RequestIdFilter"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    for formatter in config["formatters"].values():
        formatter["fmt"] += "%(request)s"
    return config


def serve(settings: Settings) -> None:
    """Serve until SIGTERM: in this process, or in as many as app/sizing.py says, on one port."""
    on_accelerator = accelerated(settings.providers)
    count = sizing.process_count(settings, on_accelerator)
    if count == 1 and sizing.feed_mode(settings, on_accelerator) == "per-process":
        run_server(settings)
    else:
        sys.exit(supervise(settings, count))


def supervise(settings: Settings, count: int) -> int:
    """``count`` server processes on the port until SIGTERM; their metrics are shared through a
    scratch folder (prometheus_client's multiprocess mode) unless PROMETHEUS_MULTIPROC_DIR names one."""
    from prometheus_client.multiprocess import mark_process_dead

    configure_logging(settings.log_level)
    with tempfile.TemporaryDirectory(prefix="cnnserve-metrics-") as scratch:
        shared = settings.prometheus_multiproc_dir or scratch
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared)  # read by prometheus_client at import, in each child
        child_settings = settings.model_copy(update={"prometheus_multiproc_dir": Path(shared)})
        sockets = listening_sockets(settings.host, settings.port, count)
        log.info("serving on http://%s:%d with %d processes", settings.host, settings.port, count)
        buckets = Path(scratch) / "ratelimit.buckets"  # every process's rate-limit buckets (app/serving/ratelimit.py)
        target = partial(run_server, child_settings, count, buckets=buckets)
        forget = partial(mark_process_dead, path=str(shared))  # its live gauges
        state = Path(scratch) / "models.json"  # explicit mode's wanted models (app/serving/control.py)
        feed, owner = shared_feed(child_settings, count)
        return Supervisor(target, sockets, on_death=forget, models_state=state, feed=feed, owner=owner).run()


def shared_feed(settings: Settings, count: int) -> tuple[Feed | None, Callable[[OwnerEnds, int], None] | None]:
    """The shared feed's region and its inference processes' target, where app/sizing.py shares."""
    if sizing.feed_mode(settings, accelerated(settings.providers)) != "shared":
        return None, None
    return make_feed(settings, count), partial(run_owner, settings)
