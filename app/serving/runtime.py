"""ONNX Runtime sessions: which execution provider, which threads, and what the session really got;
on an accelerator, fixed batch shapes with their buffers bound once (``ShapedRunner``).

A CUDA provider that fails to load only logs a warning and the session runs on the CPU
(onnxruntime #21825), so the provider a model got is read back from the session, never assumed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger("cnnserve.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CUDA_OPTIONS = {
    "cudnn_conv_algo_search": "EXHAUSTIVE",
    "arena_extend_strategy": "kSameAsRequested",
    # TF32 (on by default in the CUDA provider) moved EfficientNet-Lite0's logits by 8.3e-3 from the
    # CPU's on an H200; off, by 6.2e-6. Served images/s did not change: decoding is the limit.
    "use_tf32": "0",
}


class ProviderUnavailable(RuntimeError):
    """The settings demand an execution provider this machine cannot give."""


def choose_providers(preference: str, available: list[str]) -> list[str | tuple[str, dict[str, str]]]:
    """The provider list to ask ONNX Runtime for; the CPU stays last for operators CUDA lacks."""
    if preference == "cpu":
        return [CPU]
    if CUDA in available:
        load_cuda_libraries()
        return [(CUDA, CUDA_OPTIONS), CPU]
    if preference == "cuda":
        raise ProviderUnavailable(
            "the CUDA execution provider is demanded (CNNSERVE_PROVIDERS=cuda) but this onnxruntime offers "
            f"only {available}; install onnxruntime-gpu (pip install 'cnnserve[gpu]') on a machine with an NVIDIA GPU"
        )
    return [CPU]


@functools.cache
def load_cuda_libraries() -> None:
    """onnxruntime-gpu 1.21 and later find CUDA and cuDNN from pip's nvidia packages only once
    ``preload_dlls()`` has loaded them; without it the CUDA provider fails to load and the session
    falls back to the CPU. TensorRT's libraries (PyPI's ``tensorrt-cu12`` or ``-cu13``) load when
    its Python package is imported, where it is installed. Once per process, before its first
    CUDA session."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    with contextlib.suppress(ImportError):
        importlib.import_module("tensorrt")


def accelerated(preference: str) -> bool:
    """Whether sessions will ask for an accelerator first (what sizing.process_count needs to know).
    A CUDA demand this machine cannot meet counts too: one process then refuses every model
    visibly, rather than several processes each refusing them."""
    try:
        wanted = choose_providers(preference, ort.get_available_providers())
    except ProviderUnavailable:
        return True
    return wanted[0] != CPU


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def create_session(model: bytes | str, preference: str, threads: int) -> ort.InferenceSession:
    """A session on the preferred provider (auto, cpu or cuda) with ``threads`` intra-op threads;
    raises ProviderUnavailable if CUDA was demanded and lost."""
    wanted = choose_providers(preference, ort.get_available_providers())
    session = ort.InferenceSession(model, sess_options=session_options(threads), providers=wanted)
    got = session.get_providers()
    if preference == "cuda" and CUDA not in got:
        raise ProviderUnavailable(f"CUDA was demanded but the session fell back to {got}")
    if wanted[0] != CPU and got[0] == CPU:
        log.warning("CUDA execution provider failed to load; running on the CPU")
    return session


def tensorrt_status(available: list[str] | None = None) -> str:
    """Whether TensorRT can be used here, in words for the logs and the benchmark."""
    offered = ort.get_available_providers() if available is None else available
    if TENSORRT in offered:
        return "present"
    return "absent: this onnxruntime offers no TensorrtExecutionProvider (onnxruntime-gpu with TensorRT's libraries)"


def tensorrt_options(cache: Path, fp16: bool, device_id: int = 0) -> dict[str, str]:
    """TensorRT builds an engine per input shape at the first run, which takes tens of seconds: the
    engines are cached on disk (``cache``) so that a restart loads them, and every shape is run
    once before the model is served."""
    return {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": "True" if fp16 else "False",
    }


def accelerator_providers(
    preference: str, device_id: int = 0, tensorrt_cache: Path | None = None, fp16: bool = False
) -> list[str | tuple[str, dict[str, str]]]:
    """choose_providers on one GPU of several (``device_id``), with TensorRT first where this
    onnxruntime offers it and a cache folder is given; CUDA then runs what TensorRT cannot."""
    chosen = choose_providers(preference, ort.get_available_providers())
    if chosen[0] == CPU:
        return chosen
    cuda: list[str | tuple[str, dict[str, str]]] = [(CUDA, {**CUDA_OPTIONS, "device_id": str(device_id)}), CPU]
    if tensorrt_cache is not None and TENSORRT in ort.get_available_providers():
        tensorrt_cache.mkdir(parents=True, exist_ok=True)
        return [(TENSORRT, tensorrt_options(tensorrt_cache, fp16, device_id)), *cuda]
    return cuda


def session_on(
    model: bytes | str, providers: list[str | tuple[str, dict[str, str]]], threads: int
) -> ort.InferenceSession:
    """A session on exactly ``providers`` (accelerator_providers' list), read back as create_session does."""
    session = ort.InferenceSession(model, sess_options=session_options(threads), providers=providers)
    if providers[0] != CPU and session.get_providers()[0] == CPU:
        log.warning("the accelerator's execution provider failed to load; running on the CPU")
    return session


@dataclass
class Bound:
    """One batch shape of a model: its session, and input and output buffers bound to it once
    (ONNX Runtime's I/O binding), so that a run copies the input once, from ``input`` (to the
    GPU, on CUDA), and writes the output into ``output`` without allocating."""

    session: ort.InferenceSession
    input: np.ndarray
    output: np.ndarray
    binding: ort.IOBinding

    @classmethod
    def of(cls, session: ort.InferenceSession, names: tuple[str, str], rows: tuple[int, ...], size: int) -> Bound:
        input_name, output_name = names
        batch = np.zeros((size, *rows[:-1]), np.float32)
        output = np.zeros((size, rows[-1]), np.float32)
        binding = session.io_binding()
        binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(batch))
        binding.bind_ortvalue_output(output_name, ort.OrtValue.ortvalue_from_numpy(output))
        return cls(session, batch, output, binding)


class ShapedRunner:
    """A model run only at a few fixed batch sizes, each its own warmed shape, because on CUDA a
    session whose input shape changes between runs pays cuDNN's set-up again each time (measured
    on an H200: EfficientNet-Lite0 at batches of 1 to 8 in turn ran 7 images a second, at a fixed
    batch of 8 4,793). A batch runs at the smallest shape that holds it, so that a lone client
    pays for one image, not for a padded 32; larger ones run in chunks of the largest.

    Rows past a batch's own in the bound buffer keep whatever an earlier batch left there: a CNN
    in inference computes each row on its own, so they cost time but change no answer, and
    clearing 31 rows of 224x224x3 floats would cost more than a small batch's inference. One
    batch runs at a time (a lock): the buffers are shared by every caller."""

    def __init__(
        self, sessions: dict[int, ort.InferenceSession], names: tuple[str, str], rows: tuple[int, ...]
    ) -> None:
        """``sessions``: the session of each batch size; ``rows``: an input row's shape, then the
        output's width."""
        self.shapes = tuple(sorted(sessions))
        self.names, self.rows = names, rows
        self.bound = {size: Bound.of(session, names, rows, size) for size, session in sessions.items()}
        self.lock = threading.Lock()

    @property
    def largest(self) -> int:
        return self.shapes[-1]

    def shape_for(self, images: int) -> int:
        """The smallest batch shape that holds ``images`` (the largest for more)."""
        return next((size for size in self.shapes if size >= images), self.largest)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's rows for ``batch``, of any size."""
        return self.run_list([batch])

    def run_list(self, parts: list[np.ndarray]) -> np.ndarray:
        """The model's rows for ``parts`` (several requests' images, of any size together): the
        batcher's call. Up to the largest shape they are copied once, straight into its input."""
        with self.lock:
            if sum(len(part) for part in parts) <= self.largest:
                return self.run_parts(parts).copy()
            batch = np.concatenate(parts)
            chunks = [batch[at : at + self.largest] for at in range(0, len(batch), self.largest)]
            return np.concatenate([self.run_parts([chunk]).copy() for chunk in chunks])

    def clone(self) -> ShapedRunner:
        """Another runner on the same sessions with buffers of its own, for another thread: two
        batches can then be in flight, one copied in while the other runs."""
        sessions = {size: bound.session for size, bound in self.bound.items()}
        return ShapedRunner(sessions, self.names, self.rows)

    def run_parts(self, parts: list[np.ndarray]) -> np.ndarray:
        """``parts`` (at most ``largest`` rows together) copied straight into the bound input of
        the shape that holds them, run, and their rows of the bound output: a view, valid until
        the next run. The caller holds ``lock`` where others may run at once."""
        images = sum(len(part) for part in parts)
        bound = self.bound[self.shape_for(images)]
        at = 0
        for part in parts:
            bound.input[at : at + len(part)] = part
            at += len(part)
        bound.session.run_with_iobinding(bound.binding)
        return bound.output[:images]

    def warm(self) -> None:
        """Every shape run twice before the model is served: the first run of a shape allocates
        and, on CUDA, searches cuDNN's algorithms (TensorRT builds its engine)."""
        for bound in self.bound.values():
            for _ in range(2):
                bound.session.run_with_iobinding(bound.binding)
