"""The model repository: every folder under models/ validated, hash-checked and loaded, or refused
with a reason that /models shows. One broken folder never stops the others from being served."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import ValidationError

from app.batching import Batcher, Work
from app.config import Settings
from app.featuremaps import Analysis, FeatureMapSession, LazyFeatureMaps
from app.metrics import Metrics
from app.runtime import CPU, ProviderUnavailable, create_session
from app.spec import ModelSpec

log = logging.getLogger("cnnserve.registry")

FAST_MODEL_SECONDS = 0.001  # below this per image, one inference worker per model


class ModelRefused(Exception):
    """A model folder that cannot be served, with the reason."""


@dataclass
class LoadedModel:
    spec: ModelSpec
    session: ort.InferenceSession
    path: Path
    load_seconds: float
    analysis: Analysis = field(default_factory=lambda: Analysis([], None), repr=False)
    featuremaps: LazyFeatureMaps | None = field(default=None, repr=False)
    batcher: Batcher | None = field(default=None, repr=False)
    timeout: float = 30.0
    threads: int = 1

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run([self.spec.output.name], {self.spec.input.name: batch})
        return logits

    @cached_property
    def decodes_on_workers(self) -> bool:
        """Whether images are decoded on this model's worker threads rather than the thread pool:
        on the CPU, a one-thread worker is one core's worth of work, and decoding there too keeps
        one busy thread per core with no extra hop. Multi-thread workers would idle their other
        threads meanwhile, and an accelerator needs many cores decoding to keep it fed."""
        return self.threads == 1 and self.providers[0] == CPU

    def infer(self, work: Work) -> asyncio.Future:
        """Through the dynamic batcher, on this model's worker threads, never on the event loop;
        cancelling the future drops the request if it has not run yet."""
        return self.batcher.submit(work, self.timeout)


@dataclass(frozen=True)
class FailedModel:
    name: str
    path: Path
    reason: str


@dataclass
class Registry:
    models: dict[str, LoadedModel] = field(default_factory=dict)
    failed: dict[str, FailedModel] = field(default_factory=dict)
    loaded: bool = False

    async def close(self) -> None:
        for model in self.models.values():
            await model.batcher.close()


def load_all(settings: Settings, registry: Registry, metrics: Metrics) -> Registry:
    """Fill ``registry`` from settings.models_dir, one folder at a time, then mark it loaded."""
    folders = sorted(p for p in settings.models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        started = time.perf_counter()
        try:
            model = load_model(folder, settings, metrics, started)
        except ModelRefused as refused:
            registry.failed[folder.name] = FailedModel(folder.name, folder, str(refused))
            log.error("refused model %s: %s", folder.name, refused)
            continue
        registry.models[model.name] = model
        log.info(
            "loaded model %s on %s in %.2f s (sha256 verified); %d worker(s) x %d thread(s)",
            model.name,
            model.providers[0],
            model.load_seconds,
            model.batcher.workers,
            model.threads,
        )
    registry.loaded = True
    return registry


def load_model(folder: Path, settings: Settings, metrics: Metrics, started: float) -> LoadedModel:
    spec = read_spec(folder)
    onnx_bytes = read_verified(folder / "model.onnx", spec.sha256)
    proto = parse_onnx(onnx_bytes)
    external = check_external_data(proto, folder)
    source = str(folder / "model.onnx") if external else onnx_bytes
    model = LoadedModel(spec, open_session(source, settings), folder, 0.0, timeout=settings.request_timeout_s)
    check_signature(model)
    model.threads, workers = execution_plan(settings, warm_up(model))
    if model.threads != settings.threads:
        model.session = open_session(source, settings, model.threads)
        warm_up(model)
    model.batcher = Batcher(
        spec.name,
        model.run,
        max_batch=settings.max_batch_size,
        max_delay=settings.max_queue_delay_ms / 1000,
        max_queue=settings.max_queue,
        workers=workers,
        metrics=metrics,
    )
    if settings.featuremaps:
        if external:
            onnx.external_data_helper.load_external_data_for_model(proto, str(folder))
        attach_featuremaps(model, proto, settings)
    model.load_seconds = time.perf_counter() - started
    return model


def parse_onnx(content: bytes) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(content)
    except Exception as error:  # protobuf's DecodeError and friends
        raise ModelRefused(f"model.onnx is not a valid ONNX model: {error}") from None


def check_external_data(proto: onnx.ModelProto, folder: Path) -> bool:
    """Whether weights live in external files; refuse any that would be read from outside the
    model's folder (absolute paths, '..', symbolic links out)."""
    root = folder.resolve()
    external = False
    for tensor in proto.graph.initializer:
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        external = True
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise ModelRefused(f"external data {location!r} of tensor {tensor.name!r} lies outside the model folder")
        if not target.is_file():
            raise ModelRefused(f"external data file {location!r} of tensor {tensor.name!r} is missing")
    return external


def attach_featuremaps(model: LoadedModel, proto: onnx.ModelProto, settings: Settings) -> None:
    """Read the graph now (cheap, and /models can say what it offers); build the second session
    only when first asked, from the file re-read and re-verified then."""
    try:
        model.analysis = Analysis.of(proto, model.spec)
    except Exception as error:  # a graph onnx cannot analyse still classifies
        log.warning("model %s: no feature maps, the graph could not be analysed: %s", model.name, error)
        return

    def build() -> FeatureMapSession:
        fresh = onnx.load_from_string(read_verified(model.path / "model.onnx", model.spec.sha256))
        if check_external_data(fresh, model.path):
            onnx.external_data_helper.load_external_data_for_model(fresh, str(model.path))
        return FeatureMapSession(fresh, model.spec, model.analysis, settings, model.threads)

    model.featuremaps = LazyFeatureMaps(build)


def read_spec(folder: Path) -> ModelSpec:
    try:
        raw = json.loads((folder / "model.json").read_text())
        spec = ModelSpec.model_validate(raw)
    except FileNotFoundError:
        raise ModelRefused("model.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelRefused(f"model.json is not valid JSON: {error}") from None
    except ValidationError as error:
        raise ModelRefused(f"model.json does not match the schema: {error}") from None
    if spec.name != folder.name:
        raise ModelRefused(f"model.json names {spec.name!r} but the folder is {folder.name!r}")
    return spec


def read_verified(path: Path, expected_sha256: str) -> bytes:
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ModelRefused("model.onnx is missing") from None
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise ModelRefused(f"model.onnx sha256 is {actual}, model.json says {expected_sha256}")
    return content


def check_signature(model: LoadedModel) -> None:
    """The ONNX inputs and outputs must be what model.json says, before any request finds out."""
    spec = model.spec
    inputs = {i.name: i for i in model.session.get_inputs()}
    outputs = {o.name: o for o in model.session.get_outputs()}
    if spec.input.name not in inputs:
        raise ModelRefused(f"model.json input {spec.input.name!r} not among the ONNX inputs {list(inputs)}")
    if spec.output.name not in outputs:
        raise ModelRefused(f"model.json output {spec.output.name!r} not among the ONNX outputs {list(outputs)}")
    shape = inputs[spec.input.name].shape
    c, h, w = spec.input.channels, spec.input.height, spec.input.width
    expected = [c, h, w] if spec.input.layout == "NCHW" else [h, w, c]
    if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected, strict=False)):
        raise ModelRefused(f"ONNX input shape {shape} does not fit {spec.input.layout} {expected} from model.json")


def open_session(source: bytes | str, settings: Settings, threads: int | None = None) -> ort.InferenceSession:
    try:
        return create_session(source, settings, threads)
    except ProviderUnavailable as error:
        raise ModelRefused(str(error)) from None
    except Exception as error:  # ONNX Runtime raises several unrelated types for a bad file
        raise ModelRefused(f"ONNX Runtime cannot load model.onnx: {error}") from error


def execution_plan(settings: Settings, seconds_per_image: float) -> tuple[int, int]:
    """Intra-op threads per run and runs at once, for what the settings leave at 0. Measured on 2
    cores with 8 clients: EfficientNet-Lite0 (3 ms an image) served 22% more small JPEGs as two
    one-thread workers than as one two-thread worker, while LeNet-5 (30 us) served 40% more as one
    two-thread worker than as one one-thread worker: fast models get one worker with every core,
    slow ones a worker per core."""
    cpus = settings.cores
    if seconds_per_image < FAST_MODEL_SECONDS:
        workers = settings.inference_workers or 1
    else:
        workers = settings.inference_workers or max(1, cpus // (settings.intra_op_threads or 1))
    return settings.intra_op_threads or max(1, cpus // workers), workers


def warm_up(model: LoadedModel) -> float:
    """Real runs, which also prove the output has one score per label; returns the seconds the
    second run took (the first pays for allocations)."""
    spec = model.spec.input
    dims = (
        (1, spec.channels, spec.height, spec.width)
        if spec.layout == "NCHW"
        else (1, spec.height, spec.width, spec.channels)
    )
    batch = np.zeros(dims, np.float32)
    try:
        out = model.run(batch)
        started = time.perf_counter()
        model.run(batch)
    except Exception as error:
        raise ModelRefused(f"a test inference failed: {error}") from error
    if out.shape != (1, len(model.spec.labels)):
        raise ModelRefused(f"output shape {list(out.shape)} does not fit {len(model.spec.labels)} labels")
    return time.perf_counter() - started
