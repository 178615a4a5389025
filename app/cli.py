"""The ``cnnserve`` command line. Every option defaults to its CNNSERVE_* setting."""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from app import credentials, importing
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
    serve.add_argument("--grpc-port", type=int, help="the Open Inference Protocol over gRPC (default 8001; 0: off)")
    serve.add_argument("--models-dir", help="model repository (default models/)")
    serve.add_argument("--default-model", help="model used when a request names none")
    serve.add_argument("--providers", choices=["auto", "cpu", "cuda"], help="execution provider choice")
    serve.add_argument(
        "--processes", type=int, help="server processes sharing the port (default: one per core on the CPU, up to 4)"
    )
    serve.add_argument(
        "--feed",
        choices=["auto", "shared", "per-process"],
        help="where inference runs: shared, one inference process per GPU fed by every server process; per-process, "
        "in each (default auto: shared on a GPU, per-process on the CPU)",
    )
    serve.add_argument("--precision", choices=["fp32", "fp16"], help="on a GPU: fp16 converts each model, checked")
    serve.add_argument(
        "--model-control",
        choices=["none", "explicit", "poll"],
        help="none (default): every model at start, no repository API; explicit: the --load-model ones at start, "
        "then POST /v2/repository/models/NAME/load and .../unload; poll: every model at start, then the repository "
        "folder is watched (new folders load, changed ones reload, removed ones unload) and the API is on too",
    )
    serve.add_argument(
        "--load-model",
        action="append",
        metavar="NAME",
        help="explicit mode: a model loaded at start; repeat for several (default: none, or $CNNSERVE_LOAD_MODELS)",
    )
    serve.add_argument(
        "--poll-interval",
        type=float,
        metavar="SECONDS",
        help="poll mode: seconds between looks at the repository (default 2)",
    )
    add_ray_command(commands)
    credentials.add_commands(commands)
    importing.add_commands(commands)
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


def add_ray_command(commands: Any) -> None:
    ray = commands.add_parser(
        "ray",
        help="serve on a Ray cluster: a Ray Serve deployment per model behind the same HTTP API (cnnserve[ray])",
        description="Deploy every model of the repository as a Ray Serve deployment of its own (replicas, "
        "autoscaling on requests in flight) behind one ingress that answers the same HTTP API as `cnnserve serve`, "
        "then serve until interrupted. Needs `pip install 'cnnserve[ray]'` and the model folders on every node.",
    )
    ray.add_argument(
        "--address", help="cluster to join: auto (one `ray start` made here), ray://HOST:10001; default: start one"
    )
    ray.add_argument("--host", help="address Ray's HTTP proxy binds (default 127.0.0.1)")
    ray.add_argument("--port", type=int, help="port of Ray's HTTP proxy (default 8000)")
    ray.add_argument("--models-dir", help="model repository, the same path on every node (default models/)")
    ray.add_argument("--default-model", help="model used when a request names none")
    ray.add_argument("--load-model", action="append", metavar="NAME", help="deploy only this model; repeat for several")
    ray.add_argument("--replicas", type=int, help="replicas of each model; the least when autoscaling (default 1)")
    ray.add_argument("--max-replicas", type=int, help="autoscale each model up to this many replicas (default: fixed)")
    ray.add_argument(
        "--target-ongoing-requests", type=float, help="autoscaling: requests in flight per replica (default 2)"
    )
    ray.add_argument(
        "--max-replicas-per-node", type=int, help="most replicas of a model on one node (default: no limit)"
    )
    ray.add_argument("--replica-cpus", type=float, help="CPUs reserved for each model replica (default 1)")
    ray.add_argument(
        "--replica-resources", type=json.loads, metavar="JSON", help='custom resources of a replica: {"a": 1}'
    )
    ray.add_argument("--ingress-resources", type=json.loads, metavar="JSON", help="custom resources of the ingress")
    ray.add_argument(
        "--proxy-location", choices=["EveryNode", "HeadOnly"], help="where Ray runs HTTP proxies (default EveryNode)"
    )


def ray_settings_of(args: argparse.Namespace) -> Settings:
    options = {
        "ray_address": args.address,
        "host": args.host,
        "port": args.port,
        "models_dir": args.models_dir,
        "default_model": args.default_model,
        "load_models": ",".join(args.load_model) if args.load_model else None,
        "ray_replicas": args.replicas,
        "ray_max_replicas": args.max_replicas,
        "ray_target_ongoing_requests": args.target_ongoing_requests,
        "ray_replica_cpus": args.replica_cpus,
        "ray_max_replicas_per_node": args.max_replicas_per_node,
        "ray_replica_resources": args.replica_resources,
        "ray_ingress_resources": args.ingress_resources,
        "ray_proxy_location": args.proxy_location,
    }
    return Settings(**{key: value for key, value in options.items() if value is not None})


def serve_on_ray(args: argparse.Namespace) -> int:
    try:
        from app.rayserve.app import run
    except ModuleNotFoundError as missing:
        print(f"cnnserve ray needs Ray Serve ({missing}): pip install 'cnnserve[ray]'", file=sys.stderr)
        return 2
    run(ray_settings_of(args))
    return 0


def serve_settings_of(args: argparse.Namespace) -> Settings:
    """The options given on the command line over the CNNSERVE_* environment; ``--load-model``
    given several times becomes one comma-separated CNNSERVE_LOAD_MODELS."""
    options = {
        "models_dir": args.models_dir,
        "default_model": args.default_model,
        "providers": args.providers,
        "host": args.host,
        "port": args.port,
        "grpc_port": args.grpc_port,
        "processes": args.processes,
        "feed": args.feed,
        "precision": args.precision,
        "model_control": args.model_control,
        "load_models": ",".join(args.load_model) if args.load_model else None,
        "poll_interval_s": args.poll_interval,
    }
    return Settings(**{key: value for key, value in options.items() if value is not None})


def serve(args: argparse.Namespace) -> None:
    from app.process.server import serve as serve_settings  # here, so that `cnnserve probe` never loads ONNX Runtime

    serve_settings(serve_settings_of(args))


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
    that a health check every few seconds costs almost nothing. Over HTTPS when the service serves
    TLS, without checking the server's identity (it is this machine's own, as a kubelet's HTTPS
    probe does not check it either); under mutual TLS it presents the server's own certificate,
    which the service accepts when the client CA issued it for client authentication as well."""
    settings = Settings()
    scheme = "https" if settings.tls_cert else "http"
    url = f"{scheme}://127.0.0.1:{settings.port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=3, context=probe_tls(settings)) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as answer:  # answered, not 200 (503 while loading or draining)
        print(f"{url}: {answer.code}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        if settings.tls_client_ca:
            print(
                "under mutual TLS the probe presents CNNSERVE_TLS_CERT: the CA of CNNSERVE_TLS_CLIENT_CA must "
                "have issued it for client authentication too, or probe the port over TCP instead",
                file=sys.stderr,
            )
        return 1


def probe_tls(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no system CA store to load: nothing is verified
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if settings.tls_client_ca is not None and settings.tls_key is not None:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "serve":
        serve(args)
    else:
        commands = {
            "classify": classify,
            "models": list_models,
            "probe": probe,
            "ray": serve_on_ray,
            "import": importing.run_import,
            "check": importing.run_check,
            "token": credentials.run_token,
            "key": credentials.run_key,
        }
        sys.exit(commands[args.command](args))


if __name__ == "__main__":
    main()
