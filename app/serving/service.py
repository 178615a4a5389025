"""The data plane: classify, infer on tensors, feature maps, CAM, layers, model metadata, readiness.

Every protocol adapter (HTTP today; gRPC and Ray Serve next) calls this and nothing below it. It
owns what must be the same whichever protocol asked:

- admission: every request that costs inference (classify, infer, feature maps, CAM, layers) is
  counted against its model's capacity (app/sizing.py) from before its body is read until its
  answer is rendered, and refused with 429 and Retry-After beyond it (``Batcher.admission``); a
  body that takes longer than a request may wait to arrive is refused with 408;
- where images are decoded: inline for tiny images, on the model's own worker threads when
  app/sizing.py says so, else in the thread pool; never on the event loop for long;
- the race against a client that has gone: its queued work is dropped before it runs;
- softmax and top-k, in app/serving/postprocess.py.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import onnx

from app import tracing
from app.config import Settings
from app.serving import postprocess, preprocess
from app.serving.disconnect import Gone, unless_gone
from app.serving.errors import BadRequest, InvalidParameter, NotFound, RequestTimeout, ServingError
from app.serving.inspect import exemplars, explain_run, kernels, layers, render
from app.serving.inspect import explain as saliency
from app.serving.inspect.featuremaps import FeatureMapSession
from app.serving.inspect.graph import Layer
from app.serving.loader import Model, Refusal, dims, own_file, read_verified
from app.serving.repository import Repository
from app.serving.schemas import (
    ChannelStats,
    ClassifyResponse,
    ExplainResponse,
    FeatureMapResponse,
    InputResponse,
    KernelResponse,
    LayerInfo,
    LayerList,
    ModelInfo,
    ModelList,
    ServingPlan,
    Tensor,
    VersionStatus,
)
from app.serving.spec import InputSpec

T = TypeVar("T")
Image = bytes | Callable[[], Awaitable[bytes]]
"""An image's bytes, or the call that reads them (so that a refused request never reads its body)."""
Tensors = Mapping[str, np.ndarray]
TensorSource = Tensors | Callable[[], Awaitable[Tensors]]
"""Input tensors by name, or the call that reads and decodes them."""
MAX_TENSOR_BATCH = 64  # most images in one tensor request


@dataclass
class Lifecycle:
    """What the process tells the data plane about itself: draining after SIGTERM."""

    draining: bool = False


@dataclass(frozen=True)
class Readiness:
    ready: bool
    status: str
    models_loaded: int
    models_failed: int


@dataclass(frozen=True)
class FeatureMapView:
    """How to show a layer: ``png`` (channels tiled, each scaled on its own) or ``json`` (shape and
    per-channel statistics, the values themselves with ``values``)."""

    format: str = "png"
    colormap: str = "auto"  # auto: coolwarm for signed maps, gray otherwise
    scale: int = 0  # nearest-neighbour upscaling; 0 picks one
    values: bool = False


@dataclass(frozen=True)
class FeatureMaps:
    model: str
    layer: LayerInfo
    shape: tuple[int, ...]  # the whole layer: channels, height, width
    channels: list[int]
    body: bytes  # as the view asked: PNG, or FeatureMapResponse as JSON
    media_type: str


@dataclass(frozen=True)
class ClassActivation:
    png: bytes  # the map over the photo as the model saw it
    class_index: int
    label: str
    score: float


@dataclass(frozen=True)
class ExplainRequest:
    """What to explain and how: ``method`` one of saliency.METHODS; ``layer`` (default: the one the
    head reads); ``window`` and ``stride`` of occlusion's square (default: a seventh of the input)."""

    method: str = "gradcam"
    layer: str | None = None
    class_index: int | None = None
    format: str = "png"
    alpha: float = 0.5
    window: int | None = None
    stride: int | None = None


@dataclass(frozen=True)
class Explanation:
    model: str
    method: str
    layer: str | None
    class_index: int
    label: str
    score: float
    body: bytes  # PNG (the map over the photo) or ExplainResponse as JSON
    media_type: str


@dataclass(frozen=True)
class Signature:
    """A model's tensors and batching, as the Open Inference Protocol's metadata reports them."""

    name: str
    versions: list[str]
    input: Tensor
    output: Tensor
    max_batch_size: int
    preferred_batch_size: int
    max_queue_delay_ms: float


@dataclass(frozen=True)
class Inference:
    model: str
    version: str
    output: str
    values: np.ndarray
    labels: list[str]


class Service:
    def __init__(self, settings: Settings, repository: Repository, lifecycle: Lifecycle) -> None:
        self.settings = settings
        self.repository = repository
        self.lifecycle = lifecycle

    # -- readiness and metadata ------------------------------------------------------------

    def readiness(self) -> Readiness:
        """Loaded, the default model served, and not shutting down: /readyz and the V2 probe. In
        explicit mode the default model counts only if it is among those loaded at start: the
        others are loaded on request, and a server waiting for one is ready for it."""
        repository, settings = self.repository, self.settings
        expects_default = settings.model_control != "explicit" or settings.default_model in settings.load_model_list
        if self.lifecycle.draining:
            status = "draining: shutting down"
        elif not repository.loaded:
            status = "loading"
        elif expects_default and settings.default_model not in repository.models:
            status = "default model unavailable"
        else:
            status = "ready"
        return Readiness(status == "ready", status, len(repository.models), len(repository.refused))

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a model served now (only those become metric labels)."""
        return name in self.repository.models

    def model_ready(self, name: str, version: str | None = None) -> None:
        """Returns if the model can answer; raises the error that says why not."""
        self.repository.get(name, version)

    def catalogue(self) -> ModelList:
        entries = self.repository.entries()
        return ModelList(default_model=self.settings.default_model, models=[self._info(e) for e in entries])

    def describe(self, name: str) -> ModelInfo:
        return self._info(self.repository.entry(name))

    def _info(self, entry: Model | Refusal) -> ModelInfo:
        default = entry.name == self.settings.default_model
        versions = self._versions(entry.name)
        if isinstance(entry, Refusal):
            return ModelInfo(name=entry.name, status="failed", reason=entry.reason, default=default, versions=versions)
        spec, plan, settings = entry.spec, entry.plan, self.model_settings(entry)
        return ModelInfo(
            name=spec.name,
            status="ready",
            version=entry.version,
            versions=versions,
            description=spec.description,
            input=spec.input,
            labels=len(spec.labels),
            provider=entry.providers[0],
            providers=list(entry.providers),
            accuracy=spec.accuracy,
            source=spec.source,
            sha256=spec.sha256,
            load_seconds=round(entry.load_seconds, 3),
            default=default,
            layers=len(entry.analysis.layers) if entry.analysis else 0,
            cam=entry.analysis is not None and entry.analysis.cam is not None,
            serving=ServingPlan(
                processes=plan.processes,
                cpus=plan.cpus,
                threads=plan.threads,
                workers=plan.workers,
                decode=plan.decode,
                capacity=plan.capacity,
                padded_batch=plan.pad_to,
                alone_threads=plan.alone_threads,
                inline_batch=plan.inline_batch,
                max_batch_size=settings.max_batch_size,
                max_queue=settings.max_queue,
            ),
        )

    def model_settings(self, model: Model) -> Settings:
        """The settings ``model`` was loaded with: model.json's ``serving`` over the global ones."""
        return self.settings.model_copy(update=model.spec.serving.given())

    def _versions(self, name: str) -> list[VersionStatus]:
        """Served versions, with the reason a new copy of one was refused while the copy loaded
        before goes on serving (a broken change must be visible, not only in the log); then the
        versions refused outright."""
        served = self.repository.versions.get(name, {})
        failed = self.repository.failed_versions.get(name, {})
        return [VersionStatus(version=v, status="ready", reason=failed.get(v)) for v in served] + [
            VersionStatus(version=v, status="failed", reason=why) for v, why in failed.items() if v not in served
        ]

    def signature(self, name: str, version: str | None = None) -> Signature:
        model = self.repository.get(name, version)
        settings = self.model_settings(model)
        return Signature(
            name=model.name,
            versions=list(self.repository.versions.get(model.name, {model.version: model})),
            input=model.input,
            output=model.output,
            max_batch_size=MAX_TENSOR_BATCH,
            preferred_batch_size=settings.max_batch_size,
            max_queue_delay_ms=settings.max_queue_delay_ms,
        )

    async def layers(self, name: str) -> LayerList:
        model = self.repository.get(name)
        with model.batcher.admission():
            session = await self._featuremap_session(model)
            explainer = await self._explainer(model)
        spec = model.spec.input
        default = saliency.default_layer(session.analysis, session)
        return LayerList(
            model=model.name,
            input_shape=[spec.channels, spec.height, spec.width],
            cam=session.analysis.cam is not None,
            layers=[self._layer_info(layer, session, explainer, spec) for layer in session.analysis.layers],
            methods=[m for m in saliency.METHODS if m == "occlusion" or default is not None],
            explain_layer=default.name if default else None,
            explain_layers=saliency.default_layers(session, explainer, self.settings.max_explain_passes),
            max_passes=self.settings.max_explain_passes,
        )

    def _layer_info(
        self, layer: Layer, session: FeatureMapSession, explainer: saliency.Explainer, spec: InputSpec
    ) -> LayerInfo:
        shape = session.shapes[layer.tensor]
        methods = explainer.methods(layer.tensor, shape)
        info = layers.describe(layer, session)
        info.methods = methods
        info.passes = {m: saliency.passes(m, shape, saliency.Occlusion.default(spec), spec) for m in methods}
        return info

    # -- inference -------------------------------------------------------------------------

    def refuse_if_full(self, operation: str, name: str | None, version: str | None = None) -> None:
        """Raises Overloaded now if model ``name`` could not admit one more ``operation`` (this
        class's method of that name) at what it costs (``admission_cost``). A protocol adapter asks
        this before it parses a request, so that a flood of uploads to a full model is refused for
        next to nothing (app/http/middleware/capacity.py); the operation's own admission still
        decides, and whatever else is wrong with the request (an unknown model or version, a bad
        parameter) is the operation's to say."""
        try:
            model = self.repository.get(name, version)
        except ServingError:
            return
        model.batcher.check_room(admission_cost(model, operation))

    async def classify(
        self, name: str | None, image: Image, top_k: int, *, version: str | None = None, gone: Gone | None = None
    ) -> ClassifyResponse:
        if top_k > self.settings.max_top_k:
            raise InvalidParameter(f"top_k must be at most {self.settings.max_top_k}")
        model = self.repository.get(name, version)
        with model.batcher.admission():
            started = tracing.now()
            data = await self._read(image)
            work = preprocess.checked(data, model.spec.input, self.settings.max_pixels)
            if callable(work) and model.plan.decode == "pool":
                work = await _off_loop(work)
            if not callable(work):  # decoded here; otherwise the model's worker records its decoding
                tracing.record("decode", started)
            logits = await unless_gone(model.batcher.submit(work, model.timeout), gone)
        with tracing.span("postprocess"):
            predictions = postprocess.top_k(logits[0], model.spec.output.kind, top_k, model.spec.labels)
            return ClassifyResponse(model=model.name, predictions=predictions)

    async def infer(
        self, name: str, inputs: TensorSource, *, version: str | None = None, gone: Gone | None = None
    ) -> Inference:
        """Inference on preprocessed tensors, through the same batcher and admission as images; a
        request is charged one image until its tensors are read, then its batch size."""
        model = self.repository.get(name, version)
        with model.batcher.admission() as ticket:
            with tracing.span("decode"):
                batch = _checked_tensor(model, await self._read(inputs))
            ticket.charge(min(len(batch), model.plan.capacity))
            output = await unless_gone(model.batcher.submit(batch, model.timeout), gone)
        return Inference(model.name, model.version, model.output.name, output, model.spec.labels)

    async def featuremaps(
        self,
        name: str | None,
        image: Image,
        *,
        layer: str | None = None,
        channels: str | None = None,
        view: FeatureMapView = FeatureMapView(),
        gone: Gone | None = None,
    ) -> FeatureMaps:
        """One layer's activations for the chosen channels, rendered as ``view`` says. Decoding and
        inference run in one job on the model's worker threads, so a flood of big photos waits as
        bytes, not pixels; rendering runs in the thread pool, still under admission."""
        model = self.repository.get(name)
        with model.batcher.admission(cost=admission_cost(model, "featuremaps")):
            session = await self._featuremap_session(model)
            chosen = layers.pick(session, layer)
            shape = session.shapes[chosen.tensor]
            picked = layers.parse_channels(channels, shape[0], self.settings.max_feature_channels)
            values = len(picked) * math.prod(shape[1:])
            if view.format == "json" and view.values and values > self.settings.max_feature_values:
                limit = self.settings.max_feature_values
                raise InvalidParameter(f"{values} values asked for, the limit is {limit}; choose fewer channels")
            work = preprocess.checked(await self._read(image), model.spec.input, self.settings.max_pixels)

            def run() -> np.ndarray:
                batch = work() if callable(work) else work
                (maps,) = session.run(batch, [chosen.tensor])
                picked_maps: np.ndarray = maps[0][picked]
                return picked_maps

            maps = await unless_gone(model.batcher.call(run, model.timeout), gone)
            info = layers.describe(chosen, session)
            if view.format == "json":
                body = await _off_loop(lambda: _maps_json(model.name, info, shape, picked, maps, view.values))
                return FeatureMaps(model.name, info, shape, picked, body, "application/json")
            png = await _off_loop(lambda: _maps_png(maps, view))
            return FeatureMaps(model.name, info, shape, picked, png, "image/png")

    async def given(self, name: str | None, image: Image, *, version: str | None = None) -> bytes:
        """What the model is given, as a PNG: the picture after decoding, orientation, colour,
        resize and crop (or a digit's normalisation), before mean and std; for /classify's answer
        to be read against. Decoded in the thread pool, under admission like a classification."""
        model = self.repository.get(name, version)
        with model.batcher.admission():
            opened = preprocess.open_checked(await self._read(image), self.settings.max_pixels)
            return await _off_loop(lambda: render.png(preprocess.finish(opened, model.spec.input)))

    async def cam(
        self,
        name: str | None,
        image: Image,
        *,
        class_index: int | None = None,
        alpha: float = 0.5,
        gone: Gone | None = None,
    ) -> ClassActivation:
        """The class activation map over the photo as the model saw it (after resize and crop)."""
        model = self.repository.get(name)
        labels = model.spec.labels
        if class_index is not None and class_index >= len(labels):
            raise InvalidParameter(f"class_index must be below {len(labels)}")
        with model.batcher.admission(cost=admission_cost(model, "cam")):
            session = await self._featuremap_session(model)
            head = session.analysis.cam
            if head is None:
                raise NotFound(
                    f"model {model.name!r} has no class activation map: it needs global average pooling "
                    "followed by one linear layer"
                )
            opened = preprocess.open_checked(await self._read(image), self.settings.max_pixels)
            spec = model.spec.input

            def run() -> tuple[Any, np.ndarray, np.ndarray]:
                photo = preprocess.finish(opened, spec)
                features, logits = session.run(preprocess.to_tensor(photo, spec), [head.features, model.output.name])
                return photo, features[0], logits[0]

            photo, features, logits = await unless_gone(model.batcher.call(run, model.timeout), gone)
            chosen = int(logits.argmax()) if class_index is None else class_index
            heat = layers.class_activation(head, features, chosen)
            picture = await _off_loop(lambda: render.png(render.overlay(photo, heat, alpha)))
        score = postprocess.probabilities(logits, model.spec.output.kind)[chosen]
        return ClassActivation(picture, chosen, labels[chosen], float(score))

    async def explain(
        self, name: str | None, image: Image, request: ExplainRequest, *, gone: Gone | None = None
    ) -> Explanation:
        """A saliency map by one of saliency.METHODS, its forward passes through the model's batcher
        under one admission; refused (422) when they would exceed CNNSERVE_MAX_EXPLAIN_PASSES."""
        model = self.repository.get(name)
        labels, spec = model.spec.labels, model.spec.input
        if request.class_index is not None and request.class_index >= len(labels):
            raise InvalidParameter(f"class_index must be below {len(labels)}")
        with model.batcher.admission(cost=admission_cost(model, "explain")):
            session = await self._featuremap_session(model)
            explainer = await self._explainer(model)
            layer, window = self._explain_target(model, session, explainer, request)
            opened = preprocess.open_checked(await self._read(image), self.settings.max_pixels)

            def first() -> tuple[Any, np.ndarray, dict[str, np.ndarray]]:
                photo = preprocess.finish(opened, spec)
                x = preprocess.to_tensor(photo, spec)
                return photo, x, explainer.values(x)

            photo, x, values = await unless_gone(model.batcher.call(first, model.timeout), gone)
            output = values[explainer.output][0]
            chosen = int(output.argmax()) if request.class_index is None else request.class_index
            score = float(postprocess.probabilities(output, model.spec.output.kind)[chosen])
            heat = await self._explain_map(model, explainer, request.method, layer, window, x, values, chosen, gone)
            heat = await _off_loop(lambda: saliency.upsample(heat, spec, scale=True))
            if request.format == "json":
                body = ExplainResponse(
                    model=model.name,
                    method=request.method,
                    layer=layer.name if layer else None,
                    class_index=chosen,
                    label=labels[chosen],
                    score=score,
                    shape=[spec.height, spec.width],
                    map=np.round(heat, 4).tolist(),
                ).model_dump_json()
                media, content = "application/json", body.encode()
            else:
                media = "image/png"
                content = await _off_loop(lambda: render.png(render.overlay(photo, heat, request.alpha)))
        return Explanation(
            model.name, request.method, layer.name if layer else None, chosen, labels[chosen], score, content, media
        )

    async def kernels(self, name: str, format: str = "png") -> tuple[bytes, str]:
        """The first convolution's weights as a picture (PNG) or as KernelResponse JSON."""
        model = self.repository.get(name)
        with model.batcher.admission():
            session = await self._featuremap_session(model)
            explainer = await self._explainer(model)
            layer = kernels.first_convolution(session.analysis.layers)
            if layer is None:
                raise NotFound(f"model {model.name!r} has no convolution")
            try:
                found, bias = kernels.weights(explainer.graph, layer)
            except LookupError as error:
                raise NotFound(str(error)) from None
            if format == "json":
                body = KernelResponse(
                    model=model.name,
                    layer=layers.describe(layer, session),
                    shape=list(found.shape),
                    weights=found.tolist(),
                    bias=bias.tolist() if bias is not None else None,
                )
                return body.model_dump_json().encode(), "application/json"
            return await _off_loop(lambda: render.png(kernels.picture(found))), "image/png"

    async def exemplars(self, name: str, layer: str, channel: int, format: str = "json") -> tuple[bytes, str]:
        """The test images that excite a channel most, from the files training/exemplars.py leaves
        in the model folder: ExemplarResponse JSON or the patches in a 3 x 3 picture."""
        model = self.repository.get(name)
        with model.batcher.admission():
            found = await _off_loop(lambda: exemplars.load(model.path))
            if found is None:
                raise NotFound(f"model {model.name!r} has no exemplars (python -m training.exemplars writes them)")
            if format == "png":
                return await _off_loop(lambda: exemplars.picture(found, model.name, layer, channel)), "image/png"
            answer = await _off_loop(lambda: exemplars.answer(found, model.name, layer, channel))
            return answer.model_dump_json().encode(), "application/json"

    async def given_values(self, name: str | None, image: Image) -> InputResponse:
        """The tensor the network is given for ``image`` (normalised, channels first): the numbers
        the first convolution multiplies, for the page's lecture view. Under admission like given()."""
        model = self.repository.get(name)
        spec = model.spec.input
        with model.batcher.admission():
            opened = preprocess.open_checked(await self._read(image), self.settings.max_pixels)
            tensor = (await _off_loop(lambda: preprocess.to_tensor(preprocess.finish(opened, spec), spec)))[0]
        chw = tensor if spec.layout == "NCHW" else tensor.transpose(2, 0, 1)
        values = np.round(chw.astype(np.float64), 5).tolist()
        return InputResponse(model=model.name, shape=list(chw.shape), mean=spec.mean, std=spec.std, values=values)

    def _explain_target(
        self, model: Model, session: FeatureMapSession, explainer: saliency.Explainer, request: ExplainRequest
    ) -> tuple[Layer | None, saliency.Occlusion]:
        """The layer (None for occlusion) and occlusion's square, checked against the pass limit."""
        spec = model.spec.input
        window = saliency.Occlusion.default(spec)
        if request.window is not None or request.stride is not None:
            side = min(request.window or window.window, spec.height, spec.width)
            window = saliency.Occlusion(side, request.stride or max(1, side // 2))
        layer, shape = None, None
        if request.method != "occlusion":
            named = request.layer
            limit = self.settings.max_explain_passes
            layer = (
                layers.pick(session, named)
                if named
                else saliency.default_layer_for(request.method, session.analysis, session, explainer, limit)
            )
            if layer is None:
                raise NotFound(f"model {model.name!r} has no layer {request.method} can explain")
            shape = session.shapes[layer.tensor]
            if request.method not in explainer.methods(layer.tensor, shape):
                raise InvalidParameter(
                    f"{request.method} does not apply to layer {layer.name!r}; GET /models/{model.name}/layers "
                    "lists the methods each layer takes"
                )
        cost, limit = saliency.passes(request.method, shape, window, spec), self.settings.max_explain_passes
        if cost > limit:
            raise InvalidParameter(
                f"{request.method} at this layer needs {cost} forward passes; the limit is {limit} "
                "(CNNSERVE_MAX_EXPLAIN_PASSES): choose a layer with fewer channels, or for occlusion a larger stride"
            )
        return layer, window

    async def _explain_map(
        self,
        model: Model,
        explainer: saliency.Explainer,
        method: str,
        layer: Layer | None,
        window: saliency.Occlusion,
        x: np.ndarray,
        values: dict[str, np.ndarray],
        chosen: int,
        gone: Gone | None,
    ) -> np.ndarray:
        """The map at the layer's resolution (the input's for occlusion)."""
        kind, spec = model.spec.output.kind, model.spec.input
        batch = self.model_settings(model).max_batch_size
        chunk = batch * model.plan.workers
        tensor = layer.tensor if layer is not None else ""  # every method but occlusion has a layer
        if method == "gradcam":
            work = model.batcher.call(lambda: saliency.gradcam(explainer, values, tensor, chosen), model.timeout)
            return await unless_gone(work, gone)
        if method == "eigencam":
            return await _off_loop(lambda: saliency.eigencam(values[tensor][0]))
        if method == "scorecam":
            steps = saliency.scorecam(x, values[tensor][0], chosen, spec, kind, chunk)
        elif method == "ablationcam":
            tail = await model.batcher.call(lambda: explainer.tail(tensor), model.timeout)
            full = float(values[explainer.output][0, chosen])
            steps = saliency.ablationcam(values, tensor, tail.inputs, full, chosen, batch)
        else:
            base = float(postprocess.probabilities(values[explainer.output][0], kind)[chosen])
            steps = saliency.occlusion(x, chosen, spec, kind, window, base, chunk)
        return await explain_run.drive(steps, model, explainer, batch, gone)

    async def _explainer(self, model: Model) -> saliency.Explainer:
        """The model's Explainer, built on its worker threads the first time one is asked for."""
        key = model.featuremaps
        if key is None:
            raise NotFound(f"model {model.name!r} offers no explanations (feature maps disabled, or its graph unread)")
        found = _EXPLAINERS.get(key)
        if found is not None:
            return found

        def build() -> saliency.Explainer:
            proto = onnx.load_from_string(read_verified(own_file(model.path, "model.onnx"), model.spec.sha256))
            if any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
                onnx.external_data_helper.load_external_data_for_model(proto, str(model.path))
            return saliency.Explainer(proto, model.spec, model.inspecting, model.plan.threads)

        built = await model.batcher.call(build, model.timeout)
        return _EXPLAINERS.setdefault(key, built)

    async def _read(self, source: bytes | T | Callable[[], Awaitable[bytes | T]]) -> Any:
        """What the request brings, read now that it is admitted, within the request timeout: a
        slow upload must not hold its model's capacity for ever. (HTTP bounds the body's time as
        well, from the request's start, for the connection: app/http/middleware/request_body.py.)"""
        if not callable(source):
            return source
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                return await source()
        except TimeoutError:
            raise RequestTimeout(f"the request took over {self.settings.request_timeout_s:g} s to arrive") from None

    async def _featuremap_session(self, model: Model) -> FeatureMapSession:
        """The model's second session, built on its worker threads the first time it is asked for."""
        if model.featuremaps is None:
            raise NotFound(f"model {model.name!r} offers no feature maps (disabled, or its graph could not be read)")
        if model.featuremaps.built:
            return model.featuremaps.get()
        return await model.batcher.call(model.featuremaps.get, model.timeout)  # type: ignore[no-any-return]


JOBS = frozenset({"featuremaps", "cam", "explain"})
"""The operations that run alone on a model's worker threads, each in a batch's turn."""


def admission_cost(model: Model, operation: str) -> int:
    """What ``operation`` holds of the model's capacity while admitted, in images: a job costs a
    whole batch (app/sizing.py's ``job_cost``), anything else one image (V2 infer is charged its
    batch size once its tensors are read)."""
    return model.plan.job_cost if operation in JOBS else 1


_EXPLAINERS: weakref.WeakKeyDictionary[object, saliency.Explainer] = weakref.WeakKeyDictionary()
"""Each model's Explainer, kept as long as the model (its feature-map holder) lives."""


async def _off_loop(work: Callable[[], T]) -> T:
    """``work()`` in the loop's default thread pool (a bounded one: min(32, CPUs + 4) threads)."""
    return await asyncio.get_running_loop().run_in_executor(None, work)


def _checked_tensor(model: Model, inputs: Tensors) -> np.ndarray:
    """The one input the model takes, of the shape model.json gives it (whatever the ONNX file
    leaves symbolic), with a batch of 1 to MAX_TENSOR_BATCH: a tensor the batcher cannot join
    with an image's is refused here, not in a worker."""
    name = model.input.name
    if list(inputs) != [name]:
        raise BadRequest(f"model {model.name!r} takes one input named {name!r}")
    batch = inputs[name]
    expected = [-1, *dims(model.spec.input)[1:]]
    if len(batch.shape) != len(expected) or list(batch.shape[1:]) != expected[1:]:
        raise BadRequest(f"input {name!r} has shape {list(batch.shape)}; the model takes {expected}")
    if not 1 <= len(batch) <= MAX_TENSOR_BATCH:
        raise BadRequest(f"batch size must be 1 to {MAX_TENSOR_BATCH}, got {len(batch)}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def _maps_png(maps: np.ndarray, view: FeatureMapView) -> bytes:
    name = view.colormap if view.colormap != "auto" else ("coolwarm" if bool((maps < 0).any()) else "gray")
    upscale = view.scale or render.auto_upscale(*maps.shape[1:])
    return render.png(render.tile(maps, name, upscale, name in render.DIVERGING))


def _maps_json(
    model: str, layer: LayerInfo, shape: tuple[int, ...], picked: list[int], maps: np.ndarray, values: bool
) -> bytes:
    stats = [
        ChannelStats(index=c, min=float(m.min()), max=float(m.max()), mean=float(m.mean()))
        for c, m in zip(picked, maps, strict=True)
    ]
    body = FeatureMapResponse(
        model=model, layer=layer, shape=list(shape), channels=stats, values=maps.tolist() if values else None
    )
    return body.model_dump_json().encode()
