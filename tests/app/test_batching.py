"""The dynamic batcher on the real LeNet-5 session: joined calls, right rows back, bounded queue,
deadlines, clients that hung up, and failures."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from app.config import Settings
from app.metrics import Metrics
from app.serving.activity import Activity
from app.serving.batching import STOP, Batcher
from app.serving.errors import BadRequest, DeadlineExceeded, Overloaded
from training.data import load_split

from ..conftest import MODELS, fashion_tensor, png_bytes, running_client


@pytest.fixture(scope="module")
def lenet():
    session = ort.InferenceSession(str(MODELS / "lenet5" / "model.onnx"), providers=["CPUExecutionProvider"])
    images = fashion_tensor(load_split("test").images[:16])
    return session, images


class Gate:
    """A model call that records batch sizes and can be held shut to let a queue build up."""

    def __init__(self, session) -> None:
        self.session = session
        self.sizes: list[int] = []
        self.open = threading.Event()
        self.entered = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.open.wait(10)
        self.sizes.append(len(batch))
        return self.session.run(None, {"input": batch})[0]


def batcher(run, **options) -> Batcher:
    settings = {"max_batch": 8, "max_delay": 0.0, "max_queue": 32, "workers": 1, **options}
    capacity = settings["max_queue"] + settings["max_batch"] * settings["workers"]  # as app/sizing.py sets it
    return Batcher("lenet5", run, metrics=Metrics(), capacity=capacity, **settings)


async def hold_worker(b: Batcher, gate: Gate, image: np.ndarray) -> asyncio.Future:
    """A first request that the one worker takes and is held on, so that what follows queues."""
    first = b.submit(image, timeout=10)
    while not gate.entered.is_set():
        await asyncio.sleep(0.005)
    return first


async def release_later(gate: Gate, delay: float = 0.05) -> None:
    await asyncio.sleep(delay)
    gate.open.set()


def test_concurrent_requests_are_joined_and_each_gets_its_own_row(lenet):
    session, images = lenet
    gate = Gate(session)
    b = batcher(gate)

    async def scenario():
        first = await hold_worker(b, gate, images[:1])
        requests = [b.submit(images[i : i + 1], timeout=10) for i in range(1, 10)]
        results = await asyncio.gather(first, *requests, release_later(gate))
        await b.close()
        return results[:10]

    results = asyncio.run(scenario())
    expected = session.run(None, {"input": images[:10]})[0]
    assert gate.sizes == [1, 8, 1]  # nine waiting behind the first: one full batch of eight, then the last
    for i, row in enumerate(results):
        assert np.allclose(row, expected[i : i + 1], atol=1e-5)


class Parts(Gate):
    """A model call on the requests' images unjoined (an accelerator's bound input, the shared feed)."""

    def __init__(self, session) -> None:
        super().__init__(session)
        self.parts: list[list[int]] = []

    def run_parts(self, parts: list[np.ndarray]) -> np.ndarray:
        self.entered.set()
        self.open.wait(10)
        self.parts.append([len(part) for part in parts])
        return self.session.run(None, {"input": np.concatenate(parts)})[0]


def test_a_model_that_takes_the_requests_unjoined_gets_each_requests_images_as_they_came(lenet):
    session, images = lenet
    gate = Parts(session)
    b = batcher(gate, run_parts=gate.run_parts)

    async def scenario():
        first = await hold_worker(b, gate, images[:1])
        requests = [b.submit(images[1:3], timeout=10), b.submit(images[3:6], timeout=10)]
        results = await asyncio.gather(first, *requests, release_later(gate))
        await b.close()
        return results[:3]

    results = asyncio.run(scenario())
    expected = session.run(None, {"input": images[:6]})[0]
    assert gate.parts == [[1], [2, 3]]
    for row, (start, end) in zip(results, [(0, 1), (1, 3), (3, 6)], strict=True):
        assert np.allclose(row, expected[start:end], atol=1e-5)


def test_requests_of_several_images_share_batches_up_to_the_image_limit(lenet):
    session, images = lenet
    gate = Gate(session)
    b = batcher(gate)

    async def scenario():
        first = await hold_worker(b, gate, images[10:11])
        requests = [
            b.submit(images[0:3], timeout=10),
            b.submit(images[3:8], timeout=10),
            b.submit(images[8:10], timeout=10),
        ]
        results = await asyncio.gather(first, *requests, release_later(gate))
        await b.close()
        return results[1:4]

    results = asyncio.run(scenario())
    expected = session.run(None, {"input": images[:10]})[0]
    assert gate.sizes == [1, 8, 2]  # 3 + 5 images fill one batch of eight; the pair of two waits
    assert np.allclose(np.concatenate(results), expected, atol=1e-5)


def test_a_full_queue_refuses_at_once_with_a_retry_after(lenet):
    session, images = lenet
    gate = Gate(session)
    b = batcher(gate, max_queue=3)

    async def scenario():
        first = await hold_worker(b, gate, images[:1])  # the first is taken; three more fill the queue
        queued = [asyncio.ensure_future(b.submit(images[:1], timeout=10)) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await b.submit(images[:1], timeout=10)
        gate.open.set()
        await asyncio.gather(first, *queued)
        await b.close()
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.retry_after >= 1


def test_requests_whose_client_has_gone_cost_no_inference(lenet):
    session, images = lenet
    gate = Gate(session)
    b = batcher(gate)

    async def scenario():
        first = await hold_worker(b, gate, images[:1])
        gone = [asyncio.ensure_future(b.submit(images[:1], timeout=10)) for _ in range(5)]
        kept = asyncio.ensure_future(b.submit(images[1:2], timeout=10))
        await asyncio.sleep(0)
        for task in gone:
            task.cancel()
        gate.open.set()
        await asyncio.gather(first, kept)
        await b.close()

    asyncio.run(scenario())
    assert gate.sizes == [1, 1]


def test_a_request_past_its_deadline_is_dropped_unrun(lenet):
    session, images = lenet
    gate = Gate(session)
    b = batcher(gate)

    async def scenario():
        first = await hold_worker(b, gate, images[:1])
        late = asyncio.ensure_future(b.submit(images[:1], timeout=0.01))
        await asyncio.sleep(0.05)
        gate.open.set()
        await first
        with pytest.raises(DeadlineExceeded):
            await late
        await b.close()

    asyncio.run(scenario())
    assert gate.sizes == [1]


def test_images_decoded_on_the_worker_join_one_batch_with_the_right_rows(lenet):
    session, images = lenet
    gate = Gate(session)
    b = batcher(gate)
    expected = session.run(None, {"input": images[:4]})[0]

    async def scenario():
        first = await hold_worker(b, gate, images[:1])
        decoders = [b.submit(lambda i=i: images[i : i + 1], timeout=10) for i in range(1, 4)]
        gate.open.set()
        results = await asyncio.gather(first, *decoders)
        await b.close()
        return results

    results = asyncio.run(scenario())
    assert gate.sizes == [1, 3]
    np.testing.assert_allclose(np.concatenate(results), expected, rtol=1e-5, atol=1e-5)


def test_an_image_that_fails_to_decode_on_the_worker_fails_alone(lenet):
    session, images = lenet
    gate = Gate(session)
    b = batcher(gate)

    def refused():
        raise BadRequest("not a decodable image")

    async def scenario():
        first = await hold_worker(b, gate, images[:1])
        bad = b.submit(refused, timeout=10)
        good = b.submit(lambda: images[1:2], timeout=10)
        gate.open.set()
        results = await asyncio.gather(first, bad, good, return_exceptions=True)
        await b.close()
        return results

    _, bad, good = asyncio.run(scenario())
    assert isinstance(bad, BadRequest) and bad.status == 400
    assert good.shape == (1, 10)
    assert gate.sizes == [1, 1]


def test_a_request_whose_client_has_gone_is_never_decoded(lenet):
    session, images = lenet
    gate = Gate(session)
    b = batcher(gate)
    decoded = []

    async def scenario():
        first = await hold_worker(b, gate, images[:1])
        gone = asyncio.ensure_future(b.submit(lambda: decoded.append(1) or images[:1], timeout=10))
        await asyncio.sleep(0)
        gone.cancel()
        gate.open.set()
        await first
        await b.close()

    asyncio.run(scenario())
    assert decoded == []
    assert gate.sizes == [1]


def test_close_ends_a_worker_that_meets_the_stop_while_gathering_a_batch(lenet):
    session, images = lenet
    gate = Gate(session)
    b = batcher(gate)

    async def scenario():
        first = await hold_worker(b, gate, images[:1])
        second = b.submit(images[1:2], timeout=10)
        threads = list(b.threads)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.05)
        gate.open.set()
        answers = await first, await second
        try:
            ended = await asyncio.to_thread(lambda: [t.join(5) or not t.is_alive() for t in threads])
        finally:
            b.inbox.put(STOP)  # frees a worker that lost close()'s stop: a failure here, not a hang
        await closing
        return answers, ended

    (first, second), ended = asyncio.run(scenario())
    assert ended == [True]
    assert first.shape == second.shape == (1, 10)
    assert gate.sizes == [1, 1]


def test_a_model_failure_reaches_every_request_in_the_batch():
    def broken(batch):
        raise RuntimeError("the model broke")

    b = batcher(broken)

    async def scenario():
        results = await asyncio.gather(
            *[b.submit(np.zeros((1, 1, 28, 28), np.float32), 10) for _ in range(3)], return_exceptions=True
        )
        await b.close()
        return results

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(scenario()))


def test_admission_refuses_beyond_what_the_queue_and_the_workers_hold(lenet):
    session, _ = lenet
    b = batcher(Gate(session), max_queue=3, max_batch=2, workers=1)
    with b.admission(), b.admission(), b.admission(), b.admission(), b.admission():
        with pytest.raises(Overloaded), b.admission():
            pass
        assert b.admitted == 5
    assert b.admitted == 0
    with b.admission():
        assert b.admitted == 1


def test_a_ticket_raised_past_the_capacity_keeps_its_share_and_returns_it(lenet):
    session, _ = lenet
    b = batcher(Gate(session), max_queue=3, max_batch=2, workers=1)
    with b.admission(), b.admission() as ticket:
        ticket.charge(3)
        assert b.admitted == 4
        with pytest.raises(Overloaded):
            ticket.charge(5)
        assert b.admitted == 4 and ticket.cost == 3
    assert b.admitted == 0


def test_a_queue_delay_gathers_requests_that_arrive_close_together(lenet):
    session, images = lenet
    gate = Gate(session)
    gate.open.set()
    b = batcher(gate, max_delay=0.2)

    async def scenario():
        async def later(i):
            await asyncio.sleep(0.02 * i)
            return await b.submit(images[i : i + 1], timeout=10)

        await asyncio.gather(*[later(i) for i in range(4)])
        await b.close()

    asyncio.run(scenario())
    assert gate.sizes == [4]


def test_overload_over_http_is_429_with_retry_after(photos, monkeypatch):
    settings = Settings(models_dir=MODELS, default_model="lenet5", max_queue=2, max_batch_size=1)
    image = png_bytes(Image.open(photos["chelsea"]).convert("L").resize((28, 28)))
    with running_client(settings) as client:
        model = client.app.state.services.repository.models["lenet5"]
        hold, original = threading.Event(), model.batcher.run
        model.batcher.run = lambda batch: hold.wait(10) and original(batch)  # the one worker is held: the queue fills
        monkeypatch.setattr(model.batcher, "inline_batch", 0)  # a held model is no faster than a thread hop
        with ThreadPoolExecutor(6) as pool:
            futures = [
                pool.submit(client.post, "/classify", content=image, headers={"content-type": "image/png"})
                for _ in range(6)
            ]
            threading.Timer(1.0, hold.set).start()
            responses = [f.result() for f in futures]
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2
        too_many = next(r for r in responses if r.status_code == 429)
        assert int(too_many.headers["retry-after"]) >= 1 and "capacity" in too_many.json()["detail"]
        assert client.get("/healthz").status_code == 200


def test_other_work_runs_alone_on_the_models_own_threads(lenet):
    session, images = lenet
    gate = Gate(session)
    b = batcher(gate)

    async def scenario():
        first = await hold_worker(b, gate, images[:1])
        job = b.call(lambda: (threading.current_thread().name, list(gate.sizes)), timeout=10)
        await asyncio.sleep(0.02)
        assert not job.done()  # the one worker is busy: the job waits its turn, as a batch would
        gate.open.set()
        await first
        result = await job
        await b.close()
        return result

    thread, sizes_then = asyncio.run(scenario())
    assert thread == "infer-lenet5-0" and sizes_then == [1]


class Recorder:
    """A model call that records the thread it ran on and the batch sizes it was given."""

    def __init__(self, session) -> None:
        self.session = session
        self.calls: list[tuple[str, int]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append((threading.current_thread().name, len(batch)))
        return self.session.run(None, {"input": batch})[0]


def test_a_model_faster_than_a_thread_hop_runs_small_batches_at_once_on_the_event_loop(lenet):
    session, images = lenet
    run = Recorder(session)
    b = batcher(run, inline_batch=2)

    async def scenario():
        inline = b.submit(images[:2], timeout=10)
        done_at_once = inline.done()
        queued = b.submit(images[:3], timeout=10)  # over the inline size: through a worker
        rows = [await inline, await queued]
        await b.close()
        return done_at_once, rows

    done_at_once, (two, three) = asyncio.run(scenario())
    assert done_at_once and run.calls == [("MainThread", 2), ("infer-lenet5-0", 3)]
    expected = session.run(None, {"input": images[:3]})[0]
    assert np.allclose(two, expected[:2], atol=1e-5) and np.allclose(three, expected, atol=1e-5)


def test_a_request_alone_on_the_machine_runs_on_every_core_and_one_with_company_on_its_share(lenet):
    """The other slot stands for another server process: a request in flight there keeps this
    one's batch on its one-core session."""
    session, images = lenet
    narrow, wide = Recorder(session), Recorder(session)
    activity = Activity([0, 0], index=0)
    b = batcher(narrow, run_alone=wide, activity=activity)

    async def classify() -> np.ndarray:
        with b.admission():
            return await b.submit(images[:1], timeout=10)

    async def scenario():
        alone = await classify()
        activity.counts[1] = 1  # a request admitted in the other process
        accompanied = await classify()
        await b.close()
        return alone, accompanied

    alone, accompanied = asyncio.run(scenario())
    assert [size for _, size in wide.calls] == [1] and [size for _, size in narrow.calls] == [1]
    assert np.allclose(alone, accompanied, atol=1e-5)
    assert activity.counts[0] == 0  # every admission left


def test_activity_counts_admitted_requests_across_processes():
    mine, other = Activity([0, 0], index=0), Activity([0, 0], index=1)
    other.counts = mine.counts  # as the supervisor's shared array is for both
    mine.enter()
    assert mine.alone(1) and other.alone(1)  # its own request is all there is
    other.enter()
    assert not mine.alone(1) and mine.alone(2)
    mine.leave()
    other.leave()
    assert list(mine.counts) == [0, 0]
