"""The data plane as the ingress sees it: the same ``Service`` interface the HTTP routes call, each
request forwarded to its model's deployment, and the models' metadata asked of them once, when the
ingress starts (a replica of a model describes every replica of it: same folder, same settings).

Ray's own failures become the errors a client of ``cnnserve serve`` would get: a deployment's full
queue (``BackPressureError``) is 429 with Retry-After, a replica that died under the request (a
node removed) is 503 with Retry-After, which a client retries once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from app.config import Settings
from app.metrics import Metrics
from app.serving.control import ModelControl
from app.serving.disconnect import Gone, unless_gone
from app.serving.errors import NotFound, Overloaded, ServingError, Unavailable
from app.serving.repository import Repository
from app.serving.schemas import ClassifyResponse, InputResponse, LayerList, ModelInfo, ModelList
from app.serving.service import (
    ClassActivation,
    ExplainRequest,
    Explanation,
    FeatureMaps,
    FeatureMapView,
    Image,
    Inference,
    Lifecycle,
    Readiness,
    Service,
    Signature,
    TensorSource,
)
from app.serving.services import Services

log = logging.getLogger("cnnserve")
T = TypeVar("T")
RETRY_AFTER_S = 1  # a full deployment queue or a lost replica: Ray replaces or scales within seconds
REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)
DEFAULT_VIEW = FeatureMapView()
Send = Callable[[DeploymentHandle[Any]], Awaitable[Any]]


class RemoteControl(ModelControl):
    """Ray deploys and removes the models: the ingress loads nothing and offers no repository API."""

    def load_initial(self) -> None:
        self.repository.loaded = True


class RemoteService(Service):
    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        lifecycle: Lifecycle,
        handles: Mapping[str, DeploymentHandle[Any]],
    ) -> None:
        super().__init__(settings, repository, lifecycle)
        self.handles = dict(handles)
        self.infos: dict[str, ModelInfo] = {}
        self.signatures: dict[str, Signature] = {}

    async def connect(self) -> None:
        """Ask every model's deployment what it serves (they are up: Ray starts the ingress last)."""
        for name, handle in self.handles.items():
            self.infos[name] = await handle.describe.remote()
            self.signatures[name] = await handle.signature.remote()
        log.info("Ray ingress: models %s, on %s", sorted(self.infos), {n: i.provider for n, i in self.infos.items()})

    # -- readiness and metadata, from what the replicas said -------------------------------

    def serves(self, name: str) -> bool:
        return name in self.handles

    def readiness(self) -> Readiness:
        if self.lifecycle.draining:
            status = "draining: shutting down"
        elif self.settings.default_model not in self.infos:
            status = "default model unavailable"
        else:
            status = "ready"
        return Readiness(status == "ready", status, len(self.infos), 0)

    def model_ready(self, name: str, version: str | None = None) -> None:
        self.signature(name, version)

    def catalogue(self) -> ModelList:
        return ModelList(default_model=self.settings.default_model, models=[self.infos[n] for n in sorted(self.infos)])

    def describe(self, name: str) -> ModelInfo:
        self._handle(name)
        return self.infos[name]

    def signature(self, name: str, version: str | None = None) -> Signature:
        self._handle(name)
        signature = self.signatures[name]
        if version is not None and version not in signature.versions:
            served = ", ".join(signature.versions)
            raise NotFound(f"model {name!r} has no version {version!r} served; served versions: {served}")
        return signature

    # -- requests, forwarded -----------------------------------------------------------------

    def refuse_if_full(self, operation: str, name: str | None, version: str | None = None) -> None:
        """Nothing to check here: each model's capacity is counted in its replicas, which refuse."""

    async def layers(self, name: str) -> LayerList:
        return await self._call(name, LayerList, lambda h: h.layers.remote())

    async def classify(
        self, name: str | None, image: Image, top_k: int, *, version: str | None = None, gone: Gone | None = None
    ) -> ClassifyResponse:
        name = self._known(name, version)
        data = await self._read(image)
        return await self._call(name, ClassifyResponse, lambda h: h.classify.remote(data, top_k, version), gone)

    async def infer(
        self, name: str, inputs: TensorSource, *, version: str | None = None, gone: Gone | None = None
    ) -> Inference:
        name = self._known(name, version)
        tensors = await self._read(inputs)
        return await self._call(name, Inference, lambda h: h.infer.remote(dict(tensors), version), gone)

    async def featuremaps(
        self,
        name: str | None,
        image: Image,
        *,
        layer: str | None = None,
        channels: str | None = None,
        view: FeatureMapView = DEFAULT_VIEW,
        gone: Gone | None = None,
    ) -> FeatureMaps:
        name = self._known(name)
        data = await self._read(image)
        send = lambda h: h.featuremaps.remote(data, layer, channels, view)  # noqa: E731
        return await self._call(name, FeatureMaps, send, gone)

    async def cam(
        self,
        name: str | None,
        image: Image,
        *,
        class_index: int | None = None,
        alpha: float = 0.5,
        gone: Gone | None = None,
    ) -> ClassActivation:
        name = self._known(name)
        data = await self._read(image)
        return await self._call(name, ClassActivation, lambda h: h.cam.remote(data, class_index, alpha), gone)

    async def given(self, name: str | None, image: Image, *, version: str | None = None) -> bytes:
        name = self._known(name, version)
        data = await self._read(image)
        return await self._call(name, bytes, lambda h: h.given.remote(data, version))

    async def given_values(self, name: str | None, image: Image) -> InputResponse:
        name = self._known(name)
        data = await self._read(image)
        return await self._call(name, InputResponse, lambda h: h.given_values.remote(data))

    async def explain(
        self, name: str | None, image: Image, request: ExplainRequest, *, gone: Gone | None = None
    ) -> Explanation:
        name = self._known(name)
        data = await self._read(image)
        return await self._call(name, Explanation, lambda h: h.explain.remote(data, request), gone)

    async def kernels(self, name: str, format: str = "png") -> tuple[bytes, str]:
        picture: tuple[bytes, str] = await self._call(name, tuple, lambda h: h.kernels.remote(format))
        return picture

    async def exemplars(self, name: str, layer: str, channel: int, format: str = "json") -> tuple[bytes, str]:
        found: tuple[bytes, str] = await self._call(name, tuple, lambda h: h.exemplars.remote(layer, channel, format))
        return found

    # -- the forwarding ----------------------------------------------------------------------

    def _handle(self, name: str) -> DeploymentHandle[Any]:
        handle = self.handles.get(name)
        if handle is None:
            raise NotFound(f"unknown model {name!r}; served models: {sorted(self.handles)}")
        return handle

    def _known(self, name: str | None, version: str | None = None) -> str:
        """The model asked for, checked before its body is read, as ``cnnserve serve`` does."""
        name = name or self.settings.default_model
        self.signature(name, version)
        return name

    async def _call(self, name: str, kind: type[T], send: Send, gone: Gone | None = None) -> T:
        """``send(handle)``'s answer, with a refusal raised and Ray's errors translated; cancelled
        (and so cancelled in the replica too) when the client goes."""
        try:
            answer = await unless_gone(asyncio.ensure_future(_awaited(send(self._handle(name)))), gone)
        except RayTaskError as failed:
            if isinstance(failed.cause, ServingError):
                raise failed.cause from None
            raise
        except BackPressureError:
            raise Overloaded(name, RETRY_AFTER_S) from None
        except REPLICA_LOST as lost:
            raise Unavailable(
                f"a replica of model {name!r} was lost ({type(lost).__name__}); retry",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        if isinstance(answer, ServingError):  # the replica's answer to a request it refused (replica.answered)
            raise answer
        if not isinstance(answer, kind):
            raise TypeError(f"model {name!r} answered a {type(answer).__name__}, not a {kind.__name__}")
        return answer


async def _awaited(response: Awaitable[T]) -> T:
    return await response


async def ingress_services(settings: Settings, handles: Mapping[str, DeploymentHandle[Any]]) -> Services:
    """The ingress's services: the HTTP app's usual wiring around a RemoteService, connected."""
    settings = settings.model_copy(update={"model_control": "none"})
    metrics = Metrics(settings.prometheus_multiproc_dir)
    repository = Repository(settings, metrics, processes=1)
    lifecycle = Lifecycle()
    service = RemoteService(settings, repository, lifecycle, handles)
    await service.connect()
    return Services(settings, metrics, repository, service, lifecycle, RemoteControl(settings, repository))
