"""A real uvicorn process, talked to over a socket, as users run it."""

import json
import signal
import subprocess
import urllib.request

import pytest

from ..conftest import live_server


@pytest.fixture(scope="module")
def server():
    with live_server(output=subprocess.PIPE) as running:
        yield running


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
