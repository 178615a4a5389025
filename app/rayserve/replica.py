"""One model's replica: the same data plane as a ``cnnserve serve`` process (repository, batcher,
admission, preprocessing), holding that model alone, called by the ingress through a Ray handle.

Batching is ours, inside the replica, not Ray's ``@serve.batch``: the replica already joins the
requests it holds into one ONNX Runtime call, with our admission (429 when the model's queue is
full) and our deadlines; measured against ``@serve.batch`` in bench/ray.py (README, "Scale out:
Ray Serve"). Images travel as the bytes the client sent and are decoded here, so decoding scales
with the model's replicas, not with the ingress.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from app.config import Settings
from app.http.app import settle_garbage_collector
from app.serving import services as wiring
from app.serving.errors import ServingError
from app.serving.schemas import ClassifyResponse, InputResponse, LayerList, ModelInfo
from app.serving.service import (
    ClassActivation,
    ExplainRequest,
    Explanation,
    FeatureMaps,
    FeatureMapView,
    Inference,
    Signature,
    Tensors,
)
from app.sizing import available_cpus

log = logging.getLogger("cnnserve")
P = ParamSpec("P")
T = TypeVar("T")


def answered(call: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T | ServingError]]:
    """A client's error is returned, not raised: Ray logs every exception a replica raises with its
    traceback, and a 404 or a 429 is an answer, not a fault of ours (remote.py raises it again)."""

    @functools.wraps(call)
    async def answer(*args: P.args, **kwargs: P.kwargs) -> T | ServingError:
        try:
            return await call(*args, **kwargs)
        except ServingError as error:
            return error

    return answer


def replica_settings(settings: Settings, name: str) -> Settings:
    """The settings of a replica of ``name``: that model alone, loaded at start, and never
    managed through the repository API (Ray deploys and removes replicas)."""
    return settings.model_copy(update={"model_control": "explicit", "load_models": name, "default_model": name})


class ModelReplica:
    """Serves one model; ``cpus`` is what Ray reserved for the replica (its ``num_cpus``), and
    the replica's ONNX Runtime threads fit in it, as a ``cnnserve serve`` process fits its share."""

    def __init__(self, settings: Settings, name: str, cpus: float) -> None:
        own = max(1, int(cpus))
        settings = replica_settings(settings, name).model_copy(update={"intra_op_threads": own})
        self.name = name
        self.services = wiring.build(settings, processes=max(1, available_cpus() // own))
        self.services.control.load_initial()
        self.service = self.services.service
        self.service.model_ready(name)  # a model that failed to load fails the replica, and Ray says why
        settle_garbage_collector()
        log.info("Ray replica of %s ready: %s", name, self.service.describe(name).provider)

    def describe(self) -> ModelInfo:
        return self.service.describe(self.name)

    def signature(self, version: str | None = None) -> Signature:
        return self.service.signature(self.name, version)

    @answered
    async def layers(self) -> LayerList:
        return await self.service.layers(self.name)

    @answered
    async def classify(self, image: bytes, top_k: int, version: str | None = None) -> ClassifyResponse:
        return await self.service.classify(self.name, image, top_k, version=version)

    @answered
    async def infer(self, tensors: Tensors, version: str | None = None) -> Inference:
        return await self.service.infer(self.name, tensors, version=version)

    @answered
    async def featuremaps(
        self, image: bytes, layer: str | None, channels: str | None, view: FeatureMapView
    ) -> FeatureMaps:
        return await self.service.featuremaps(self.name, image, layer=layer, channels=channels, view=view)

    @answered
    async def cam(self, image: bytes, class_index: int | None, alpha: float) -> ClassActivation:
        return await self.service.cam(self.name, image, class_index=class_index, alpha=alpha)

    @answered
    async def given(self, image: bytes, version: str | None = None) -> bytes:
        return await self.service.given(self.name, image, version=version)

    @answered
    async def given_values(self, image: bytes) -> InputResponse:
        return await self.service.given_values(self.name, image)

    @answered
    async def explain(self, image: bytes, request: ExplainRequest) -> Explanation:
        return await self.service.explain(self.name, image, request)

    @answered
    async def kernels(self, format: str) -> tuple[bytes, str]:
        return await self.service.kernels(self.name, format)

    @answered
    async def exemplars(self, layer: str, channel: int, format: str) -> tuple[bytes, str]:
        return await self.service.exemplars(self.name, layer, channel, format)

    def check_health(self) -> None:
        """Ray's health check: the model is still served."""
        self.service.model_ready(self.name)
