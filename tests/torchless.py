"""A pytest plugin that makes ``import torch`` fail, for the service's tests (``-p tests.torchless``):
the service must run where only it is installed, and its tests prove that by running without torch
even on a machine that has it for training."""

from __future__ import annotations

import sys

BLOCKED = ("torch", "torchvision", "onnxscript")


def pytest_configure() -> None:
    for name in BLOCKED:
        if name in sys.modules and sys.modules[name] is not None:
            raise RuntimeError(f"{name} was imported before the torchless plugin ran")
        sys.modules[name] = None  # type: ignore[assignment]  # None makes import raise ImportError
