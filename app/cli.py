"""The ``cnnserve`` command line. Every option defaults to its CNNSERVE_* setting."""

from __future__ import annotations

import argparse
import os
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.config import Settings


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
    return parser.parse_args(argv)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT turns /readyz to 503 and keeps serving for
    CNNSERVE_DRAIN_SECONDS (so a load balancer stops sending), then shuts down gracefully:
    requests in flight finish before the process exits. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float) -> None:
        super().__init__(config)
        self.served_app = app
        self.drain_seconds = drain_seconds

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        already = self.served_app.state.draining
        self.served_app.state.draining = True
        if already or self.drain_seconds <= 0:
            super().handle_exit(sig, frame)
        else:
            threading.Timer(self.drain_seconds, super().handle_exit, (sig, frame)).start()


def serve(args: argparse.Namespace) -> None:
    overrides = {
        "CNNSERVE_MODELS_DIR": args.models_dir,
        "CNNSERVE_DEFAULT_MODEL": args.default_model,
        "CNNSERVE_PROVIDERS": args.providers,
        "CNNSERVE_HOST": args.host,
        "CNNSERVE_PORT": None if args.port is None else str(args.port),
    }
    os.environ.update({key: value for key, value in overrides.items() if value is not None})
    from app.main import create_app

    settings = Settings()
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30
    )
    DrainingServer(config, app, settings.drain_seconds).run()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main()
