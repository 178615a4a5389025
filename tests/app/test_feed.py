"""The shared feed: batches through shared memory to an inference process and back, with real
sessions on the CPU provider. First the protocol in one process (a client and an owner on two
lanes of a real region), then a real deployment: answers equal to a server process's own session,
a killed process of each kind, nothing left in /dev/shm."""

import contextlib
import http.client
import io
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from app.config import Settings
from app.process.supervisor import OWNER_YOUNG_DEATHS, Supervisor
from app.serving.errors import DeadlineExceeded
from app.serving.feed import SUBMITTED, TAKEN, Feed, FeedClient, FeedRefused, OwnerLost, encode_key
from app.serving.loader import read_spec
from app.serving.owner import Owner, Taken, pack
from app.serving.preprocess import prepare
from bench.gpu_serving import v2_request

from ..conftest import MODELS, live_server
from .test_server import command_line

SETTINGS = Settings(providers="cpu", batch_shapes="1,4")
WAIT_S = 60.0  # a generous bound on anything a test waits for, never reached when it passes
FEED_ENV = {"CNNSERVE_FEED": "shared", "CNNSERVE_PROCESSES": "2", "CNNSERVE_BATCH_SHAPES": "1,4"}


@pytest.fixture(scope="module")
def lenet():
    session = ort.InferenceSession(str(MODELS / "lenet5" / "model.onnx"), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(3).normal(size=(6, 1, 28, 28)).astype(np.float32)
    key = encode_key("lenet5", "1", str(MODELS / "lenet5"), read_spec(MODELS / "lenet5").sha256)
    return session, images, key


@pytest.fixture
def feed() -> Feed:
    return Feed.create(owners=1, lanes=2, slots=2, slot_bytes=2 << 20)  # its descriptors close with the test process


class Running:
    """An owner answering on its own thread until the test ends."""

    def __init__(self, feed: Feed, generation: int = 0) -> None:
        self.owner = Owner(SETTINGS, feed.owner(0), generation)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.owner.serve, args=(self.stop,), daemon=True)
        self.thread.start()

    def end(self) -> None:
        self.stop.set()
        self.thread.join(timeout=WAIT_S)


def in_thread(call, *args):
    """``call(*args)`` on a thread; the returned dict gets its result or its error."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = call(*args)
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


def wait_for_state(client: FeedClient, state: int, slots: int = 1) -> None:
    deadline = time.monotonic() + WAIT_S
    while (client.headers["state"] == state).sum() < slots:
        assert time.monotonic() < deadline, f"no slot reached state {state}"
        time.sleep(0.005)


def test_a_batch_handed_through_shared_memory_comes_back_as_the_session_answers_it(feed, lenet):
    session, images, key = lenet
    owner, client = Running(feed), FeedClient(feed.lane(0))
    try:
        assert client.load(key, WAIT_S).provider == "CPUExecutionProvider"
        rows = client.run(key, [images[:3]], WAIT_S)
    finally:
        owner.end()
    assert np.allclose(rows, session.run(None, {"input": images[:3]})[0], atol=1e-5)


def test_several_requests_go_into_one_slot_unjoined_and_each_gets_its_rows(feed, lenet):
    session, images, key = lenet
    owner, client = Running(feed), FeedClient(feed.lane(0))
    try:
        client.load(key, WAIT_S)
        rows = client.run(key, [images[:1], images[1:4], images[4:5]], WAIT_S)
    finally:
        owner.end()
    assert np.allclose(rows, session.run(None, {"input": images[:5]})[0], atol=1e-5)


def test_two_threads_of_the_owner_answer_requests_of_two_lanes_at_once(feed, lenet):
    session, images, key = lenet
    owner, stop = Owner(SETTINGS, feed.owner(0), 0), threading.Event()
    serving = threading.Thread(target=owner.serve, args=(stop, 2), daemon=True)
    serving.start()
    clients = [FeedClient(feed.lane(0)), FeedClient(feed.lane(1))]
    try:
        clients[0].load(key, WAIT_S)
        calls = [in_thread(c.run, key, [images[i : i + 2]], WAIT_S) for i, c in enumerate(clients * 3)]
        for call in calls:
            call["thread"].join(timeout=WAIT_S)
    finally:
        stop.set()
        serving.join(timeout=WAIT_S)
    for i, call in enumerate(calls):
        assert np.allclose(call["result"], session.run(None, {"input": images[i : i + 2]})[0], atol=1e-5)


def test_batches_of_two_server_processes_are_answered_in_one_step_of_the_owner(feed, lenet):
    session, images, key = lenet
    owner = Running(feed)
    first, second = FeedClient(feed.lane(0)), FeedClient(feed.lane(1))
    first.load(key, WAIT_S)
    owner.end()  # from here the test steps the owner itself
    calls = [in_thread(first.run, key, [images[:1]], WAIT_S), in_thread(second.run, key, [images[1:3]], WAIT_S)]
    wait_for_state(first, SUBMITTED)
    wait_for_state(second, SUBMITTED)
    owner.owner.step()
    for call, expected in zip(calls, (images[:1], images[1:3]), strict=True):
        call["thread"].join(timeout=WAIT_S)
        assert np.allclose(call["result"], session.run(None, {"input": expected})[0], atol=1e-5)


def test_slots_are_packed_in_order_into_runs_no_larger_than_the_largest_shape():
    slots = [Taken(slot, slot, images) for slot, images in enumerate([1, 2, 3, 9])]
    assert [[t.slot for t in group] for group in pack(slots, largest=4)] == [[0, 1], [2], [3]]


def test_a_batch_the_dead_owner_held_fails_with_a_retryable_503(feed, lenet):
    _, images, key = lenet
    client = FeedClient(feed.lane(0))
    call = in_thread(client.run, key, [images[:1]], WAIT_S)
    wait_for_state(client, SUBMITTED)
    client.headers["state"][client.headers["state"] == SUBMITTED] = TAKEN  # as an owner takes it, then dies
    feed.replaced_owner(0)
    call["thread"].join(timeout=WAIT_S)
    error = call["error"]
    assert isinstance(error, OwnerLost) and error.status == 503 and error.headers == {"Retry-After": "1"}


def test_a_batch_its_dead_owner_had_not_taken_is_answered_by_the_replacement(feed, lenet):
    session, images, key = lenet
    client = FeedClient(feed.lane(0))
    call = in_thread(client.run, key, [images[:2]], WAIT_S)
    wait_for_state(client, SUBMITTED)
    replacement = Running(feed, feed.replaced_owner(0))  # it loads the model at the first request naming it
    try:
        call["thread"].join(timeout=WAIT_S)
    finally:
        replacement.end()
    assert np.allclose(call["result"], session.run(None, {"input": images[:2]})[0], atol=1e-5)


def test_a_request_past_its_deadline_is_refused_unrun(feed, lenet):
    _, images, key = lenet
    owner, client = Running(feed), FeedClient(feed.lane(0))
    client.load(key, WAIT_S)
    owner.end()
    call = in_thread(client.run, key, [images[:1]], 0.01)
    wait_for_state(client, SUBMITTED)
    time.sleep(0.05)
    owner.owner.step()
    call["thread"].join(timeout=WAIT_S)
    assert isinstance(call["error"], DeadlineExceeded)


def test_a_new_copy_of_a_models_files_replaces_the_old_one_in_the_owner(feed, lenet):
    _, _, key = lenet
    owner = Owner(SETTINGS, feed.owner(0), 0)
    stale = encode_key("lenet5", "1", str(MODELS / "lenet5"), "0" * 64)
    other_version = encode_key("lenet5", "2", str(MODELS / "lenet5"), "0" * 64)
    owner.models[stale] = owner.models[other_version] = "refused"
    owner.model(key)
    assert set(owner.models) == {key, other_version}


def test_a_model_the_owner_cannot_load_is_refused_with_its_reason(feed):
    owner, client = Running(feed), FeedClient(feed.lane(0))
    try:
        with pytest.raises(FeedRefused, match="changed while loading"):
            client.load(encode_key("lenet5", "1", str(MODELS / "lenet5"), "0" * 64), WAIT_S)
    finally:
        owner.end()


def test_a_replacement_server_process_starts_with_every_slot_of_its_lane_free(feed, lenet):
    _, images, key = lenet
    dead = FeedClient(feed.lane(0))
    in_thread(dead.run, key, [images[:1]], WAIT_S)
    wait_for_state(dead, SUBMITTED)
    replacement = FeedClient(feed.lane(0))
    assert (replacement.headers["state"] == SUBMITTED).sum() == 0


def crash_at_start(ends, generation) -> None:
    """An inference process that dies as it starts (CUDA failing to initialise, say)."""
    os._exit(7)


def test_an_inference_process_that_keeps_dying_young_stops_the_deployment(feed):
    """Rather than restarting it forever while the server processes wait for it."""
    supervisor = Supervisor(lambda *args: None, [], feed=feed, owner=crash_at_start)
    supervisor.owners = [supervisor.start_owner(0)]
    for _ in range(OWNER_YOUNG_DEATHS):
        assert not supervisor.failed
        supervisor.owners[0].join(timeout=WAIT_S)
        supervisor.replace_dead_owners()
    assert supervisor.failed and supervisor.stopping.is_set()


# -- a real deployment ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_jpeg(photos) -> bytes:
    buffer = io.BytesIO()
    Image.open(photos["chelsea"]).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def classify(port: int, body: bytes, model: str = "efficientnet_lite0") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        connection.request(
            "POST", f"/classify?model={model}&top_k=5", body=body, headers={"content-type": "image/jpeg"}
        )
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def started(log: Path, kind: str) -> list[int]:
    """The pids the supervisor logged starting, of ``kind`` ("server" or "inference")."""
    return [int(pid) for pid in re.findall(rf"started {kind} process (\d+)", log.read_text())]


def logged(log: Path, *parts: str) -> bool:
    return any(all(part in line for part in parts) for line in log.read_text().splitlines())


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    log = tmp_path_factory.mktemp("feed") / "server.log"
    with log.open("w") as output, live_server(output=output, **FEED_ENV) as (url, server):
        yield int(url.rsplit(":", 1)[1]), server, log


def test_the_feed_answers_as_a_server_process_with_its_own_session_does(deployment, live_url, small_jpeg):
    port, _, _ = deployment
    for model in ("efficientnet_lite0", "lenet5"):
        status, _, body = classify(port, small_jpeg, model)
        _, _, expected = classify(int(live_url.rsplit(":", 1)[1]), small_jpeg, model)
        assert status == 200
        ours, theirs = (json.loads(b)["predictions"] for b in (body, expected))
        assert [p["index"] for p in ours] == [p["index"] for p in theirs]
        assert np.allclose([p["score"] for p in ours], [p["score"] for p in theirs], atol=1e-5)


def test_v2_binary_tensors_through_the_feed_answer_as_a_process_with_its_own_session(deployment, live_url, small_jpeg):
    port = deployment[0]
    spec = read_spec(MODELS / "efficientnet_lite0").input
    request = v2_request("efficientnet_lite0", spec, np.concatenate([prepare(small_jpeg, spec, 50_000_000)] * 3))
    answers = []
    for target in (port, int(live_url.rsplit(":", 1)[1])):
        connection = http.client.HTTPConnection("127.0.0.1", target, timeout=WAIT_S)
        connection.request("POST", request.path, body=request.body, headers=request.headers)
        response = connection.getresponse()
        assert response.status == 200
        length = int(response.getheader("Inference-Header-Content-Length"))
        answers.append(np.frombuffer(response.read()[length:], np.float32).reshape(3, -1))
        connection.close()
    assert np.allclose(answers[0], answers[1], atol=1e-4)


class Load:
    """Clients posting until stopped, each answer's status (and Retry-After of a 503) recorded."""

    def __init__(self, port: int, body: bytes, clients: int = 3) -> None:
        self.port, self.body = port, body
        self.statuses: Counter[int | str] = Counter()
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def client(self) -> None:
        while not self.stop.is_set():
            try:
                status, headers, _ = classify(self.port, self.body, "lenet5")
                outcome: int | str = status if status != 503 else f"503 retry-after {headers.get('retry-after')}"
            except (ConnectionError, http.client.HTTPException):
                outcome = "connection lost"
            with self.lock:
                self.statuses[outcome] += 1

    def answered(self) -> int:
        with self.lock:
            return sum(self.statuses.values())

    def end(self) -> Counter[int | str]:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=WAIT_S)
        return self.statuses


def test_a_killed_inference_process_is_replaced_and_only_what_it_held_fails_with_a_retryable_503(
    deployment, small_jpeg
):
    port, _, log = deployment
    owner = started(log, "inference")[-1]
    load = Load(port, small_jpeg)
    try:
        wait_for(lambda: load.answered() >= 30, "30 answers before the kill")
        os.kill(owner, signal.SIGKILL)
        wait_for(lambda: len(started(log, "inference")) > 1, "a replacement inference process")
        answered = load.answered()
        wait_for(lambda: load.answered() >= answered + 60, "60 answers after the replacement")
    finally:
        statuses = load.end()
    assert set(statuses) <= {200, "503 retry-after 1"}, statuses
    assert statuses[200] > 90, statuses


def test_a_killed_server_process_is_replaced_and_the_feed_keeps_answering(deployment, small_jpeg):
    port, _, log = deployment
    victim = started(log, "server")[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(started(log, "server")) > 2, "a replacement server process")
    replacement = started(log, "server")[-1]
    wait_for(lambda: logged(log, f"cnnserve[{replacement}]: ", "model(s) loaded"), "the replacement's models loaded")
    assert all(classify(port, small_jpeg, "lenet5")[0] == 200 for _ in range(20))


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def feed_regions(pid: int) -> int:
    """How many of the feed's memory regions process ``pid`` has mapped."""
    try:
        return Path(f"/proc/{pid}/maps").read_text().count("memfd:cnnserve-feed")
    except OSError:
        return 0


def test_nothing_is_left_in_dev_shm_after_a_stop_or_a_crash(tmp_path):
    before = shm_entries()
    log = tmp_path / "server.log"
    crashing = {"TMPDIR": str(tmp_path), **FEED_ENV}  # the killed supervisor's scratch folder stays there
    with log.open("w") as output, live_server(output=output, **crashing) as (_, server):
        children = started(log, "server") + started(log, "inference")
        assert all(feed_regions(pid) for pid in children), "every process maps the one region"
        assert shm_entries() == before, "the region is no file in /dev/shm"
        for pid in [server.pid, *children]:  # a crash of the whole deployment
            os.kill(pid, signal.SIGKILL)
        server.wait(timeout=WAIT_S)
    wait_for(lambda: not any(b"spawn_main" in command_line(pid) for pid in children), "the children gone")
    assert shm_entries() == before


def test_the_inference_process_stops_when_its_supervisor_is_killed(tmp_path):
    """An orphan would hold the GPU's memory until someone found it."""
    log = tmp_path / "server.log"
    crashing = {"TMPDIR": str(tmp_path), **FEED_ENV}  # the killed supervisor's scratch folder stays there
    with log.open("w") as output, live_server(output=output, **crashing) as (_, server):
        servers, owner = started(log, "server"), started(log, "inference")[0]
        server.kill()
        server.wait(timeout=WAIT_S)
        try:
            wait_for(lambda: not command_line(owner), "the inference process gone")
        finally:
            for pid in servers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_a_stopped_deployment_leaves_no_process_and_nothing_in_dev_shm(tmp_path):
    before = shm_entries()
    log = tmp_path / "server.log"
    with log.open("w") as output, live_server(output=output, **FEED_ENV) as (_, server):
        children = started(log, "server") + started(log, "inference")
    assert server.returncode == 0
    assert not [pid for pid in children if command_line(pid)]
    assert shm_entries() == before
