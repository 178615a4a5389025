"""A model folder -> a finished, immutable model, or ModelRefused with the reason.

Every check runs before a request can find out: model.json against its schema, the sha256 of
model.onnx, external data that would be read from outside the folder, the ONNX inputs and outputs
against model.json, and real test inferences (which also measure the model for app/sizing.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import ValidationError

from app import sizing
from app.config import Settings
from app.metrics import Metrics
from app.serving import accelerated
from app.serving.activity import Activity
from app.serving.batching import Batcher
from app.serving.feed import FeedClient, FeedRefused, encode_key
from app.serving.inspect.featuremaps import Analysis, FeatureMapSession, LazyFeatureMaps
from app.serving.runtime import CPU, ProviderUnavailable, create_session
from app.serving.schemas import Tensor
from app.serving.spec import InputSpec, ModelSpec

log = logging.getLogger("cnnserve.loader")

RunParts = Callable[[list[np.ndarray]], np.ndarray]
FLAT_VERSION = "1"  # the version of a model kept flat: model.onnx beside model.json
FEED_LOAD_SECONDS = 900  # the inference process's load and warm-up (a TensorRT engine build takes minutes)
TIMED_RUNS = 5  # warm_up: the fastest of these is a model's own cost per batch
TIMING_BUDGET_S = 0.2  # ... or of as many as fit here, for a model slow on this machine


class ModelRefused(Exception):
    """A model folder that cannot be served, with the reason."""


def tensor(node: Any) -> Tensor:
    """An input or output of the session, with -1 for each symbolic dimension."""
    return Tensor(node.name, node.type, tuple(d if isinstance(d, int) and d > 0 else -1 for d in node.shape))


@dataclass(frozen=True)
class Model:
    """A served model: its spec, session, plan and batcher, fixed once loaded."""

    spec: ModelSpec
    path: Path
    session: ort.InferenceSession
    providers: tuple[str, ...]
    input: Tensor
    output: Tensor
    plan: sizing.Plan
    batcher: Batcher
    analysis: Analysis | None  # None: the graph could not be read, or feature maps are off
    featuremaps: LazyFeatureMaps | None
    timeout: float
    load_seconds: float
    version: str = FLAT_VERSION
    fingerprint: tuple[object, ...] = ()  # what its files looked like when loaded (app/serving/repository.py)
    inspecting: str = "auto"  # providers of this process's own sessions (explanations): "cpu" beside the shared feed

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Refusal:
    """A model folder that is not served, and why."""

    name: str
    path: Path
    reason: str


def load(
    folder: Path,
    settings: Settings,
    metrics: Metrics,
    processes: int,
    activity: Activity | None = None,
    *,
    name: str | None = None,
    version: str = FLAT_VERSION,
    feed: FeedClient | None = None,
) -> Model:
    """The model ``name`` (the folder's name by default) at ``version``, from ``folder`` (the model's
    own, or one of its numbered version folders). Everything is checked and measured before the
    model exists, and every batch size it can be asked to run has run once (the first run of a
    shape allocates); raises ModelRefused. model.json's ``serving`` overrides the settings. With a
    ``feed``, the shared feed's inference process runs the batches: this process's own session,
    on the CPU, only checks the model and serves its feature maps."""
    started = time.perf_counter()
    fingerprint = fingerprint_of(folder)
    spec = read_spec(folder, name)
    settings = settings.model_copy(update=spec.serving.given())
    onnx_bytes = read_verified(own_file(folder, "model.onnx"), spec.sha256)
    proto = parse_onnx(onnx_bytes)
    external = check_external_data(proto, folder)
    source = str(folder / "model.onnx") if external else onnx_bytes
    own = "cpu" if feed is not None else settings.providers  # a feed's server process holds no CUDA context
    guess = 1 if feed is not None else sizing.first_guess(settings, processes)
    session = open_session(source, own, guess)
    model_input, model_output = check_signature(spec, session)
    providers = tuple(session.get_providers())
    seconds = warm_up(spec, session)
    if feed is not None:
        plan = sizing.feed_plan(settings, processes)
    else:
        plan = sizing.plan(settings, processes, seconds, providers[0] == CPU)
    if plan.threads != guess:
        session = open_session(source, own, plan.threads)
    alone = open_session(source, own, plan.alone_threads) if plan.alone_threads else None
    for warmed in (session, alone):
        for size in plan.warm_batches if warmed else ():
            warm_up(spec, warmed, size, runs=1)
    elsewhere = inference(folder, spec, proto, settings, plan, feed, version)
    run_parts, providers = elsewhere or (None, providers)
    batcher = Batcher(
        spec.name,
        runner(session, spec) if run_parts is None else one_part(run_parts),
        max_batch=plan.max_batch,
        max_delay=settings.max_queue_delay_ms / 1000,
        max_queue=settings.max_queue,
        workers=plan.workers,
        capacity=plan.capacity,
        metrics=metrics,
        run_alone=runner(alone, spec) if alone else None,
        activity=activity,
        inline_batch=plan.inline_batch,
        provider=providers[0],
        run_parts=run_parts,
    )
    analysis, featuremaps = None, None
    if settings.featuremaps:
        if external:
            onnx.external_data_helper.load_external_data_for_model(proto, str(folder))
        inspecting = settings.model_copy(update={"providers": own})  # on the CPU beside the shared feed
        analysis, featuremaps = inspection(proto, folder, spec, inspecting, plan.threads)
    return Model(
        spec=spec,
        path=folder,
        session=session,
        providers=providers,
        input=model_input,
        output=model_output,
        plan=plan,
        batcher=batcher,
        analysis=analysis,
        featuremaps=featuremaps,
        timeout=settings.request_timeout_s,
        load_seconds=time.perf_counter() - started,
        version=version,
        fingerprint=fingerprint,
        inspecting=own,
    )


def inference(
    folder: Path,
    spec: ModelSpec,
    proto: onnx.ModelProto,
    settings: Settings,
    plan: sizing.Plan,
    feed: FeedClient | None,
    version: str,
) -> tuple[RunParts, tuple[str, ...]] | None:
    """The batcher's call (on the requests' images, unjoined) and the provider it runs on, where
    it is not this process's session:
    the shared feed's inference process (which loads and warms the model before this returns),
    or this process's own accelerator session at fixed batch shapes (app/serving/accelerated.py)."""
    if feed is not None:
        return feed_runner(feed, folder, spec, settings, version)
    if not plan.shapes:
        return None
    if check_external_data(proto, folder):
        onnx.external_data_helper.load_external_data_for_model(proto, str(folder))
    try:
        shaped = accelerated.build(proto, folder, spec, settings)
    except accelerated.Refused as error:
        raise ModelRefused(str(error)) from None
    log.info("model %s: %s", spec.name, shaped.describe())
    return shaped.runner.run_list, (shaped.provider,)


def feed_runner(
    feed: FeedClient, folder: Path, spec: ModelSpec, settings: Settings, version: str
) -> tuple[RunParts, tuple[str, ...]]:
    """The call that hands a batch to the shared feed's inference process, once it has the model."""
    try:
        key = encode_key(spec.name, version, str(folder.resolve()), spec.sha256)
        loaded = feed.load(key, FEED_LOAD_SECONDS)
    except FeedRefused as error:
        raise ModelRefused(f"the inference process refused it: {error}") from None
    log.info("model %s version %s runs in the inference process: %s", spec.name, version, loaded.description)
    timeout = settings.request_timeout_s

    def run(parts: list[np.ndarray]) -> np.ndarray:
        return feed.run(key, parts, timeout)

    return run, (loaded.provider,)


def one_part(run_parts: RunParts) -> Callable[[np.ndarray], np.ndarray]:
    """``run_parts`` as a call on one batch."""

    def run(batch: np.ndarray) -> np.ndarray:
        return run_parts([batch])

    return run


def fingerprint_of(folder: Path) -> tuple[object, ...]:
    """What changes when a model's files are replaced: each file's name, size and modification time
    (nanoseconds). Cheap enough to take every few seconds for every model (poll mode)."""
    entries = []
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


def runner(session: ort.InferenceSession, spec: ModelSpec) -> Callable[[np.ndarray], np.ndarray]:
    """The batcher's call: a batch in, the output model.json names out."""
    outputs, input_name = [spec.output.name], spec.input.name

    def run(batch: np.ndarray) -> np.ndarray:
        (result,) = session.run(outputs, {input_name: batch})
        return result  # type: ignore[no-any-return]  # ORT's stubs say list[Any]

    return run


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


def inspection(
    proto: onnx.ModelProto, folder: Path, spec: ModelSpec, settings: Settings, threads: int
) -> tuple[Analysis | None, LazyFeatureMaps | None]:
    """Read the graph now (cheap, and /models can say what it offers); build the second session
    only when first asked, from the file re-read and re-verified then."""
    try:
        analysis = Analysis.of(proto, spec)
    except Exception as error:  # a graph onnx cannot analyse still classifies
        log.warning("model %s: no feature maps, the graph could not be analysed: %s", spec.name, error)
        return None, None

    def build() -> FeatureMapSession:
        fresh = onnx.load_from_string(read_verified(own_file(folder, "model.onnx"), spec.sha256))
        if check_external_data(fresh, folder):
            onnx.external_data_helper.load_external_data_for_model(fresh, str(folder))
        return FeatureMapSession(fresh, spec, analysis, settings.providers, threads)

    return analysis, LazyFeatureMaps(build)


def read_spec(folder: Path, name: str | None = None) -> ModelSpec:
    """model.json of ``folder``, which must name the model ``name`` (the folder's own by default)."""
    try:
        raw = json.loads(own_file(folder, "model.json").read_text())
        spec = ModelSpec.model_validate(raw)
    except FileNotFoundError:
        raise ModelRefused("model.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelRefused(f"model.json is not valid JSON: {error}") from None
    except ValidationError as error:
        raise ModelRefused(f"model.json does not match the schema: {error}") from None
    expected = name or folder.name
    if spec.name != expected:
        raise ModelRefused(f"model.json names {spec.name!r} but the model is {expected!r}")
    return spec


def own_file(folder: Path, filename: str) -> Path:
    """``folder / filename``, refused if a symbolic link takes it out of the folder: nothing outside
    the repository is read (a model.json linked to another JSON file would show that file's
    contents in the reason it is refused)."""
    path = folder / filename
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ModelRefused(f"{filename} lies outside the model folder (a symbolic link out)")
    return path


def read_verified(path: Path, expected_sha256: str) -> bytes:
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise ModelRefused("model.onnx is missing") from None
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise ModelRefused(f"model.onnx sha256 is {actual}, model.json says {expected_sha256}")
    return content


def check_signature(spec: ModelSpec, session: ort.InferenceSession) -> tuple[Tensor, Tensor]:
    """The ONNX input and output must be what model.json says, before any request finds out."""
    inputs = {i.name: tensor(i) for i in session.get_inputs()}
    outputs = {o.name: tensor(o) for o in session.get_outputs()}
    if len(inputs) != 1 or spec.input.name not in inputs:
        raise ModelRefused(f"model.json input {spec.input.name!r} is not the one ONNX input of {list(inputs)}")
    if spec.output.name not in outputs:
        raise ModelRefused(f"model.json output {spec.output.name!r} not among the ONNX outputs {list(outputs)}")
    shape = inputs[spec.input.name].shape
    expected = list(dims(spec.input)[1:])
    if len(shape) != 4 or any(d != -1 and d != e for d, e in zip(shape[1:], expected, strict=True)):
        raise ModelRefused(
            f"ONNX input shape {list(shape)} does not fit {spec.input.layout} {expected} from model.json"
        )
    return inputs[spec.input.name], outputs[spec.output.name]


def dims(spec: InputSpec, batch: int = 1) -> tuple[int, int, int, int]:
    """The input tensor's shape for ``batch`` images."""
    if spec.layout == "NCHW":
        return (batch, spec.channels, spec.height, spec.width)
    return (batch, spec.height, spec.width, spec.channels)


def open_session(source: bytes | str, preference: str, threads: int) -> ort.InferenceSession:
    try:
        return create_session(source, preference, threads)
    except ProviderUnavailable as error:
        raise ModelRefused(str(error)) from None
    except Exception as error:  # ONNX Runtime raises several unrelated types for a bad file
        raise ModelRefused(f"ONNX Runtime cannot load model.onnx: {error}") from error


def warm_up(spec: ModelSpec, session: ort.InferenceSession, size: int = 1, runs: int = TIMED_RUNS) -> float:
    """Real runs of a batch of ``size``, which also prove the output has one score per label;
    returns the seconds per image of the fastest timed run. The first run is not timed (it pays
    for allocations and, on CUDA, for the algorithm search of this shape); the fastest of up to
    ``runs`` (or of those that fit in TIMING_BUDGET_S) is the model's own cost, where one run
    would be the machine's: a preemption during it once made LeNet-5 (30 us) look slower than
    sizing's 1 ms bound on a loaded CI machine, and sizing gave it two workers."""
    run = runner(session, spec)
    batch = np.zeros(dims(spec.input, size), np.float32)
    fastest, spent = float("inf"), 0.0
    try:
        out = run(batch)
        for _ in range(runs):
            started = time.perf_counter()
            run(batch)
            took = time.perf_counter() - started
            fastest, spent = min(fastest, took), spent + took
            if spent > TIMING_BUDGET_S:
                break
    except Exception as error:
        raise ModelRefused(f"a test inference failed: {error}") from error
    if out.shape != (size, len(spec.labels)):
        raise ModelRefused(f"output shape {list(out.shape)} does not fit {len(spec.labels)} labels")
    return fastest / size
