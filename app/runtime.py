"""ONNX Runtime sessions: which execution provider, which threads, and what the session really got.

A CUDA provider that fails to load only logs a warning and the session runs on the CPU
(onnxruntime #21825), so the provider a model got is read back from the session, never assumed.
"""

from __future__ import annotations

import logging

import onnxruntime as ort

from app.config import MAX_AUTO_PROCESSES, Settings, available_cpus

log = logging.getLogger("cnnserve.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
CUDA_OPTIONS = {"cudnn_conv_algo_search": "EXHAUSTIVE", "arena_extend_strategy": "kSameAsRequested"}


class ProviderUnavailable(RuntimeError):
    """The settings demand an execution provider this machine cannot give."""


def choose_providers(preference: str, available: list[str]) -> list[str | tuple[str, dict]]:
    """The provider list to ask ONNX Runtime for; the CPU stays last for operators CUDA lacks."""
    if preference == "cpu":
        return [CPU]
    if CUDA in available:
        return [(CUDA, CUDA_OPTIONS), CPU]
    if preference == "cuda":
        raise ProviderUnavailable(
            "the CUDA execution provider is demanded (CNNSERVE_PROVIDERS=cuda) but this onnxruntime offers "
            f"only {available}; install onnxruntime-gpu (pip install 'cnnserve[gpu]') on a machine with an NVIDIA GPU"
        )
    return [CPU]


def process_count(settings: Settings) -> int:
    """How many server processes to start. On the CPU, one per core: each process's event loop then
    has a core of its own, and the Python around a fast model's inference stops being the limit
    (measured on 2 cores against one process: LeNet-5 served 55% more 28x28 PNGs, small JPEGs 10%
    more, 12-megapixel JPEGs 5% fewer). With CUDA, one process owns the GPU so that its batches
    fill it."""
    if settings.processes:
        return settings.processes
    try:
        wanted = choose_providers(settings.providers, ort.get_available_providers())
    except ProviderUnavailable:
        return 1  # every model will be refused, with the reason, in the one process
    return 1 if wanted[0] != CPU else min(available_cpus(), MAX_AUTO_PROCESSES)


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def create_session(model: bytes | str, settings: Settings, threads: int | None = None) -> ort.InferenceSession:
    """A session on the configured provider with ``threads`` intra-op threads (default: the
    settings'); raises ProviderUnavailable if CUDA was demanded and lost."""
    wanted = choose_providers(settings.providers, ort.get_available_providers())
    options = session_options(threads or settings.threads)
    session = ort.InferenceSession(model, sess_options=options, providers=wanted)
    got = session.get_providers()
    if settings.providers == "cuda" and CUDA not in got:
        raise ProviderUnavailable(f"CUDA was demanded but the session fell back to {got}")
    if wanted[0] != CPU and got[0] == CPU:
        log.warning("CUDA execution provider failed to load; running on the CPU")
    return session
