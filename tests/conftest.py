"""Shared fixtures: the real model repository, real photos, and apps built on them."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.http.app import create_app
from training.photos import sample_photos

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    return sample_photos()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS


def wait_loaded(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not client.app.state.services.repository.loaded:
        assert time.monotonic() < deadline, "models never finished loading"
        time.sleep(0.02)


@contextmanager
def running_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        wait_loaded(client)
        yield client


@pytest.fixture(scope="session")
def client() -> Iterator[TestClient]:
    """The real app on the real models/ folder."""
    with running_client(Settings(models_dir=MODELS)) as client:
        yield client


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A scratch model repository holding copies of two small real models."""
    for name in ("lenet5", "kernels"):
        shutil.copytree(MODELS / name, tmp_path / name)
    return tmp_path


def spec_of(folder: Path) -> dict:
    return json.loads((folder / "model.json").read_text())


def fashion_tensor(images: np.ndarray, name: str = "lenet5") -> np.ndarray:
    """uint8 (N, 28, 28) Fashion-MNIST images -> the (N, 1, 28, 28) input that model.json describes,
    without torch: the service's tests run where only the service is installed."""
    spec = spec_of(MODELS / name)["input"]
    return ((images.astype(np.float32) - spec["mean"][0]) / spec["std"][0])[:, None]


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60.0, in_a_row: int = 10) -> None:
    """Ready when /readyz answers 200 ``in_a_row`` times on fresh connections: with several server
    processes, the kernel spreads connections, so one 200 may come from the first process up."""
    deadline, ready = time.monotonic() + timeout, 0
    while ready < in_a_row:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                ready = ready + 1 if response.status == 200 else 0
                continue
        except OSError:
            ready = 0
        assert process.poll() is None, "the server exited before it was ready"
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.1)


@contextmanager
def live_server(output: int = subprocess.DEVNULL, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``python -m app serve`` process on a free loopback port, ready when yielded and
    stopped with SIGTERM (if the test has not stopped it already) afterwards."""
    port = free_port()
    # no gRPC unless a test asks for it: the default port 8001 may be another server's
    environment = {**os.environ, "CNNSERVE_PORT": str(port), "CNNSERVE_GRPC_PORT": "0", "PYTHONUNBUFFERED": "1", **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"],
        cwd=ROOT,
        env=environment,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


@pytest.fixture(scope="session")
def live_url() -> Iterator[str]:
    """One real server for the tests that only talk to it (tests that stop a server start their own)."""
    with live_server() as (url, _):
        yield url


def asgi_post(path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    """The scope of a POST of a PNG, for tests that drive the ASGI app by hand."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"image/png"), (b"host", b"test"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "root_path": "",
        "state": {},
    }
