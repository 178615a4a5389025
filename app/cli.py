"""The ``cnnserve`` command line. Every option defaults to its CNNSERVE_* setting."""

from __future__ import annotations

import argparse
import os

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


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    overrides = {
        "CNNSERVE_MODELS_DIR": args.models_dir,
        "CNNSERVE_DEFAULT_MODEL": args.default_model,
        "CNNSERVE_PROVIDERS": args.providers,
        "CNNSERVE_HOST": args.host,
        "CNNSERVE_PORT": None if args.port is None else str(args.port),
    }
    os.environ.update({key: value for key, value in overrides.items() if value is not None})
    settings = Settings()
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main()
