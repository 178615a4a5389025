"""The Ray Serve application: a deployment per model (replicas, autoscaling on requests in flight,
placement by custom resources) and one HTTP ingress deployment running ``create_app`` over a
RemoteService, so the routes, errors, limits and answers are those of ``cnnserve serve``.

Started by ``cnnserve ray`` (which joins or starts a cluster and runs the application), or by Ray's
own ``serve run app.rayserve.app:build ray_max_replicas=4 ...`` with any setting as ``key=value``.

Bounds, as in the native server: an ingress replica holds at most ``max_queue`` requests waiting
for it beyond those it serves (Ray's proxy answers 429 with Retry-After past that); each model's
deployment the same at each caller (BackPressureError, 429), and each replica's own admission
answers 429 past its capacity. Every model folder must be on every node (the same image, or a
shared volume at ``models_dir``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from app.config import Settings
from app.http.app import create_app
from app.rayserve.remote import RETRY_AFTER_S, ingress_services
from app.rayserve.replica import ModelReplica

APP_NAME = "cnnserve"
INGRESS_NAME = "ingress"
THROUGHPUT_OPTIMIZED = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
"""Ray's high-throughput mode (Ray 2.56 and later): HAProxy in front, the ingress replicas listening
directly, gRPC between replicas, user code on the replica's own event loop. Measured in bench/ray.py
(README): less CPU per request and lower latency than Ray's defaults, and every test passes in it."""
INGRESS_MAX_ONGOING = 1000  # an ingress replica is async I/O: it holds what the models' bounds allow
QUIET = {"enable_access_log": False}
"""Ray writes an access line per request in every replica it passes, as files on each node; the
ingress's metrics and request ids say the same, once."""


@serve.ingress()
class Ingress:
    """The HTTP API; every request that costs inference goes to its model's deployment."""

    async def __init__(self, settings: Settings, models: dict[str, DeploymentHandle[Any]]) -> None:  # type: ignore[misc]  # Ray awaits it
        self.services = await ingress_services(settings, models)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(services=self.services)


def model_names(settings: Settings) -> list[str]:
    """The models to deploy: those named by ``load_models``, or every folder of the repository, as
    ``cnnserve serve`` loads them (a folder that fails to load fails its deployment, and
    ``serve status`` says why)."""
    if settings.load_model_list:
        return settings.load_model_list
    return sorted(p.name for p in settings.models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scaling(settings: Settings) -> dict[str, Any]:
    """Fixed replicas, or autoscaling on requests in flight between ray_replicas and ray_max_replicas."""
    if settings.ray_max_replicas <= settings.ray_replicas:
        return {"num_replicas": settings.ray_replicas}
    return {
        "autoscaling_config": {
            "min_replicas": settings.ray_replicas,
            "initial_replicas": settings.ray_replicas,
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": settings.ray_target_ongoing_requests,
            "upscale_delay_s": settings.ray_upscale_delay_s,
            "downscale_delay_s": settings.ray_downscale_delay_s,
        }
    }


def spread(settings: Settings) -> dict[str, Any]:
    """At most ``ray_max_replicas_per_node`` replicas of a model on a node, when set: a node lost
    then takes one replica of each model with it, not all of them."""
    per_node = settings.ray_max_replicas_per_node
    return {"max_replicas_per_node": per_node} if per_node else {}


def model_deployment(settings: Settings, name: str, replica: type[ModelReplica] = ModelReplica) -> Application:
    deployment = serve.deployment(
        name=name,
        ray_actor_options={"num_cpus": settings.ray_replica_cpus, "resources": settings.ray_replica_resources},
        max_ongoing_requests=settings.max_queue,
        max_queued_requests=settings.max_queue,
        health_check_period_s=2.0,
        logging_config=QUIET,
        **spread(settings),
        **scaling(settings),
    )(replica)
    return deployment.bind(settings, name, settings.ray_replica_cpus)


def application(settings: Settings, replica: type[ModelReplica] = ModelReplica) -> Application:
    """The application for ``serve.run``: every model's deployment (``replica`` its class; bench/ray.py
    measures another), and the ingress bound to them.
    The repository's path, and those of the keys and JWKS files, are made absolute: Ray's workers
    do not start in this directory (each must be at that path on the ingress's node)."""
    files = {
        "models_dir": settings.models_dir,
        "keys_file": settings.keys_file,
        "jwt_jwks_file": settings.jwt_jwks_file,
    }
    settings = settings.model_copy(update={name: path.resolve() for name, path in files.items() if path is not None})
    models = {name: model_deployment(settings, name, replica) for name in model_names(settings)}
    ingress = serve.deployment(
        name=INGRESS_NAME,
        num_replicas=settings.ray_ingress_replicas,
        ray_actor_options={"num_cpus": 0, "resources": settings.ray_ingress_resources},
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        max_queued_requests=settings.max_queue,
        backpressure_config={"status_code": 429, "retry_after_s": RETRY_AFTER_S},
        logging_config=QUIET,
    )(Ingress)
    return ingress.bind(settings, models)


def settings_of(args: dict[str, str]) -> Settings:
    """The settings from the environment, with each ``key=value`` of ``serve run`` (a setting's
    name; JSON for the resource maps) over them."""
    given: dict[str, Any] = {
        key: json.loads(value) if key.endswith("_resources") else value for key, value in args.items()
    }
    return Settings(**given)


def build(args: dict[str, str]) -> Application:
    """``serve run app.rayserve.app:build key=value ...``."""
    return application(settings_of(args))


def run(settings: Settings, replica: type[ModelReplica] = ModelReplica) -> None:
    """``cnnserve ray``: join the cluster (or start one on this machine), deploy, and serve until
    interrupted; then the application is deleted (and a cluster started here, stopped)."""
    import ray

    if settings.ray_throughput_optimized and not settings.ray_address:
        for name, value in THROUGHPUT_OPTIMIZED.items():
            os.environ.setdefault(name, value)  # inherited by the cluster's processes, started just below
    ray.init(address=settings.ray_address or None, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(proxy_location=settings.ray_proxy_location, http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings, replica), name=APP_NAME, route_prefix="/")
    print(f"cnnserve on Ray Serve: http://{settings.host}:{settings.port}/ (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
