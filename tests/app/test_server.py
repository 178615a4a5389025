"""A real uvicorn process, talked to over a socket, as users run it."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.process.topology import ConnectionShare

from ..conftest import ROOT, free_port, live_server, png_bytes, wait_ready


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


def server_processes(pid: int) -> list[int]:
    """The server processes a `cnnserve serve` supervisor has started (not multiprocessing's tracker),
    leaving out a child that is gone between the listing and the look at it (one just killed)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in command_line(int(c))]


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # ProcessLookupError or FileNotFoundError: it has exited
        return b""


@pytest.fixture(scope="module")
def several(tmp_path_factory):
    metrics_dir = tmp_path_factory.mktemp("metrics")
    with live_server(output=subprocess.PIPE, CNNSERVE_PROCESSES="2", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)) as (
        url,
        process,
    ):
        yield url, process, metrics_dir


def classify_lenet(url: str, image: bytes) -> dict:
    request = urllib.request.Request(f"{url}/classify?model=lenet5", data=image, headers={"content-type": "image/png"})
    with urllib.request.urlopen(request, timeout=30) as response:  # a fresh connection each time
        return json.loads(response.read())


def test_several_processes_share_the_port_and_metrics_count_them_all(several, photos):
    url, process, metrics_dir = several
    pids = server_processes(process.pid)
    assert len(pids) == 2
    image = png_bytes(Image.open(photos["chelsea"]).convert("L").resize((28, 28)))
    for _ in range(60):
        assert len(classify_lenet(url, image)["predictions"]) == 5
    families = {
        f.name: f for f in text_string_to_metric_families(urllib.request.urlopen(f"{url}/metrics").read().decode())
    }
    served = sum(
        s.value
        for s in families["cnnserve_requests"].samples
        if s.name.endswith("_total") and s.labels["endpoint"] == "/classify" and s.labels["status"] == "200"
    )
    assert served == 60  # whichever process answered /metrics, it counted the other's requests too
    recorded = {int(f.stem.rsplit("_", 1)[1]) for f in metrics_dir.glob("counter_*.db")}
    assert set(pids) <= recorded  # the kernel spread the 60 connections over both processes


def open_connections(client: httpx.Client) -> dict[str, float]:
    """Per server process (pid), the open connections it last published to /metrics."""
    text = client.get("/metrics").text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "cnnserve_open_connections")
    return {sample.labels["pid"]: sample.value for sample in family.samples}


@pytest.fixture(scope="module")
def two_processes():
    """Quiet (a pipe nobody reads would fill with access-log lines and stall the server)."""
    with live_server(CNNSERVE_PROCESSES="2") as (url, _):
        yield url


def test_keep_alive_connections_end_up_spread_evenly_over_the_processes(two_processes):
    url = two_processes
    clients = [httpx.Client(base_url=url, limits=httpx.Limits(max_connections=1)) for _ in range(16)]
    try:
        until = time.monotonic() + 2
        while time.monotonic() < until:  # the kernel's split, whatever it was, then rebalancing
            assert all(client.get("/healthz").status_code == 200 for client in clients)
        time.sleep(0.3)  # each process publishes its count every 0.1 s
        counts = open_connections(clients[0])
        rebalanced = clients[0].get("/metrics").text
    finally:
        for client in clients:
            client.close()
    assert sorted(counts.values()) == [8, 8]
    assert "cnnserve_connections_rebalanced_total" in rebalanced


def test_a_process_holding_more_than_its_share_sends_one_client_away_per_interval():
    counts = multiprocessing.RawArray("i", [0, 3])
    share = ConnectionShare(counts, 0, connections={object() for _ in range(6)})
    assert share.crowded()  # 6 of 9: the even share is 5
    assert counts[0] == 5  # the one sent away no longer counts
    assert not share.crowded()  # not again within the interval
    share.next_check = 0
    share.connections = set(list(share.connections)[:5])
    counts[1] = 4  # the client reconnected, and the kernel gave it to the other process
    assert not share.crowded()


def test_an_even_split_sends_nobody_away():
    counts = multiprocessing.RawArray("i", [0, 4])
    assert not ConnectionShare(counts, 0, connections={object() for _ in range(4)}).crowded()
    counts = multiprocessing.RawArray("i", [0, 0, 3])
    assert not ConnectionShare(counts, 0, connections={object() for _ in range(2)}).crowded()


def test_a_server_process_that_dies_is_replaced(several, photos):
    url, process, _ = several
    victim = server_processes(process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim in server_processes(process.pid) or len(server_processes(process.pid)) < 2:
        assert time.monotonic() < deadline, "no replacement process was started"
        time.sleep(0.1)
    wait_ready(url, process)
    image = png_bytes(Image.open(photos["chelsea"]).convert("L").resize((28, 28)))
    assert all(len(classify_lenet(url, image)["predictions"]) == 5 for _ in range(20))


def test_sigterm_stops_every_server_process(several):
    _, process, _ = several
    pids = server_processes(process.pid)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert output.count("Finished server process") == 2
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


@pytest.mark.parametrize("target", [["app.main:app"], ["--factory", "app.main:create_app"]], ids=["app", "factory"])
def test_uvicorn_serves_the_documented_app_and_its_factory(target, photos):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "uvicorn", *target, "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, process, in_a_row=1)
        image = png_bytes(Image.open(photos["chelsea"]).convert("L").resize((28, 28)))
        assert len(classify_lenet(url, image)["predictions"]) == 5
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def rebalanced_headers(read_body: bool) -> list[tuple[bytes, bytes]]:
    """The headers a crowded process sends on a response to a POST whose body the app did or did
    not read first."""
    import asyncio

    from prometheus_client import CollectorRegistry, Counter

    from app.http.middleware.rebalance import Rebalance

    async def answer(scope, receive, send):
        if read_body:
            await receive()
        await send({"type": "http.response.start", "status": 429, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b"0123456789", "more_body": False}

    sent = []

    async def send(message):
        sent.append(message)

    counter = Counter("rebalanced", "test", registry=CollectorRegistry())
    scope = {"type": "http", "headers": [(b"content-length", b"10")]}
    asyncio.run(Rebalance(answer, crowded=lambda: True, counter=counter)(scope, receive, send))
    return sent[0]["headers"]


def test_a_crowded_process_sends_away_a_client_whose_upload_it_has_read():
    assert (b"connection", b"close") in rebalanced_headers(read_body=True)


def test_a_client_answered_before_its_upload_was_read_is_never_cut_off():
    assert (b"connection", b"close") not in rebalanced_headers(read_body=False)
