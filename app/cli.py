"""The ``cnnserve`` command line. Every option defaults to its CNNSERVE_* setting."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
import threading
import urllib.request
from functools import partial
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE

from app.config import Settings
from app.workers import ConnectionShare, Rebalance, Slot, Supervisor, listening_sockets

log = logging.getLogger("cnnserve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cnnserve",
        description="Serve CNN classifiers from a model repository over HTTP, on ONNX Runtime.",
        epilog="Every setting can also come from the environment: CNNSERVE_MODELS_DIR, CNNSERVE_DEFAULT_MODEL, "
        "CNNSERVE_PROVIDERS, CNNSERVE_PORT, ... (see README.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP service")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--models-dir", help="model repository (default models/)")
    serve.add_argument("--default-model", help="model used when a request names none")
    serve.add_argument("--providers", choices=["auto", "cpu", "cuda"], help="execution provider choice")
    serve.add_argument(
        "--processes", type=int, help="server processes sharing the port (default: one per core on the CPU, up to 4)"
    )
    classify = commands.add_parser("classify", help="classify image files with a running service, print the top-k")
    classify.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    classify.add_argument("--model", help="model name (default: the service's default model)")
    classify.add_argument("--top-k", type=int, default=5, help="how many classes (default 5)")
    probe = commands.add_parser(
        "probe", help="exit 0 if this machine's service answers 200 on PATH (a container HEALTHCHECK)"
    )
    probe.add_argument("path", nargs="?", default="/healthz", help="/healthz (default) or /readyz")
    for client_command in (classify, commands.add_parser("models", help="list the models a running service has")):
        client_command.add_argument("--url", help="the service (default $CNNSERVE_URL or http://127.0.0.1:8000)")
        client_command.add_argument("--api-key", help="API key, if the service needs one (default $CNNSERVE_API_KEY)")
    return parser.parse_args(argv)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT turns /readyz to 503 and keeps serving for
    CNNSERVE_DRAIN_SECONDS (so a load balancer stops sending), then shuts down gracefully:
    requests in flight finish before the process exits. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float) -> None:
        super().__init__(config)
        self.served_app = app
        self.drain_seconds = drain_seconds
        self.share: ConnectionShare | None = None

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s: this process's open connections, for /metrics and for the other processes."""
        open_connections = len(self.server_state.connections)
        self.served_app.state.metrics.connections.set(open_connections)
        if self.share is not None:
            self.share.publish()
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        already = self.served_app.state.draining
        self.served_app.state.draining = True
        if already or self.drain_seconds <= 0:
            super().handle_exit(sig, frame)
        else:
            threading.Timer(self.drain_seconds, super().handle_exit, (sig, frame)).start()


def run_server(sockets: list[socket.socket] | None = None, slot: Slot | None = None) -> None:
    """One server process, configured by the environment (which serve() has filled in); one of
    several when the supervisor gives it a ``slot`` in the shared connection counts."""
    from app.main import create_app

    settings = Settings()
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30
    )
    server = DrainingServer(config, app, settings.drain_seconds)
    if slot is not None:
        server.share = ConnectionShare(slot, server.server_state.connections)
        app.add_middleware(Rebalance, share=server.share, counter=app.state.metrics.rebalanced)
    server.run(sockets)
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def serve(args: argparse.Namespace) -> None:
    overrides = {
        "CNNSERVE_MODELS_DIR": args.models_dir,
        "CNNSERVE_DEFAULT_MODEL": args.default_model,
        "CNNSERVE_PROVIDERS": args.providers,
        "CNNSERVE_HOST": args.host,
        "CNNSERVE_PORT": None if args.port is None else str(args.port),
        "CNNSERVE_PROCESSES": None if args.processes is None else str(args.processes),
    }
    os.environ.update({key: value for key, value in overrides.items() if value is not None})
    from app.runtime import process_count  # here, so that `cnnserve probe` never loads ONNX Runtime

    settings = Settings()
    count = process_count(settings)
    if count == 1:
        run_server()
    else:
        sys.exit(supervise(settings, count))


def supervise(settings: Settings, count: int) -> int:
    """``count`` server processes on the port until SIGTERM; their metrics are shared through a
    scratch folder (prometheus_client's multiprocess mode) unless PROMETHEUS_MULTIPROC_DIR names one."""
    from prometheus_client.multiprocess import mark_process_dead

    from app.main import configure_logging

    configure_logging(settings.log_level)
    os.environ["CNNSERVE_PROCESSES"] = str(count)  # each process sizes its ONNX Runtime threads by it
    with tempfile.TemporaryDirectory(prefix="cnnserve-metrics-") as scratch:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", scratch)
        sockets = listening_sockets(settings.host, settings.port, count)
        log.info("serving on http://%s:%d with %d processes", settings.host, settings.port, count)
        forget = partial(mark_process_dead, path=os.environ["PROMETHEUS_MULTIPROC_DIR"])  # its live gauges
        return Supervisor(run_server, sockets, on_death=forget).run()


def print_table(rows: list[list[str]], header: list[str]) -> None:
    """Every column right-aligned but the last, which holds free text."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join([cell.rjust(width) for cell, width in zip(row[:-1], widths, strict=True)] + [row[-1]]))


def classify(args: argparse.Namespace) -> int:
    import httpx

    from app.client import Client, ServiceError

    failures = 0
    with Client(args.url, args.api_key) as client:
        for image in args.images:
            try:
                result = client.classify(image, args.model, args.top_k)
            except (ServiceError, OSError, httpx.HTTPError) as error:
                print(f"{image}: {error}", file=sys.stderr)
                failures += 1
                continue
            print(f"{image} ({result.model})")
            rows = [
                [str(rank), f"{p.score:.2%}", str(p.index), p.label] for rank, p in enumerate(result.predictions, 1)
            ]
            print_table(rows, ["rank", "score", "index", "label"])
    return 1 if failures else 0


def list_models(args: argparse.Namespace) -> int:
    from app.client import Client

    with Client(args.url, args.api_key) as client:
        listing = client.models()
    rows = [
        [m.name + (" *" if m.default else ""), m.status, m.provider or "-", str(m.labels or "-"), m.reason or ""]
        for m in listing.models
    ]
    print_table(rows, ["model", "status", "provider", "classes", "note"])
    return 0


def probe(args: argparse.Namespace) -> int:
    """Asks the service on this machine's loopback, at the configured port; no client library, so
    that a health check every few seconds costs almost nothing."""
    url = f"http://127.0.0.1:{Settings().port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "serve":
        serve(args)
    else:
        sys.exit({"classify": classify, "models": list_models, "probe": probe}[args.command](args))


if __name__ == "__main__":
    main()
