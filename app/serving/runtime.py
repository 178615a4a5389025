"""ONNX Runtime sessions: which execution provider, which threads, and what the session really got.

A CUDA provider that fails to load only logs a warning and the session runs on the CPU
(onnxruntime #21825), so the provider a model got is read back from the session, never assumed.
"""

from __future__ import annotations

import logging

import onnxruntime as ort

log = logging.getLogger("cnnserve.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
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
        return [(CUDA, CUDA_OPTIONS), CPU]
    if preference == "cuda":
        raise ProviderUnavailable(
            "the CUDA execution provider is demanded (CNNSERVE_PROVIDERS=cuda) but this onnxruntime offers "
            f"only {available}; install onnxruntime-gpu (pip install 'cnnserve[gpu]') on a machine with an NVIDIA GPU"
        )
    return [CPU]


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
