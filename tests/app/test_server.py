"""A real uvicorn process, talked to over a socket, as users run it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from ..conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "CNNSERVE_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.2)
    yield url, process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_a_real_server_classifies_a_photo_over_a_socket(server, photos):
    url, _ = server
    request = urllib.request.Request(
        f"{url}/classify?top_k=3", data=photos["chelsea"].read_bytes(), headers={"content-type": "image/png"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    assert "cat" in body["predictions"][0]["label"] and len(body["predictions"]) == 3


def test_the_server_logs_each_model_and_its_provider_then_stops_on_sigterm(server):
    _, process = server
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert "loaded model efficientnet_lite0 on CPUExecutionProvider" in output
    assert "loaded model lenet5 on CPUExecutionProvider" in output
    assert "Finished server process" in output  # uvicorn shut down gracefully, then re-raised the signal
    assert process.returncode in (0, -signal.SIGTERM)
