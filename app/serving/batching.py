"""Dynamic batching per model: concurrent requests joined into one ONNX Runtime call.

Modelled on Triton's dynamic batcher: a request waits at most ``max_delay`` for company (0, the
default, batches only what is already waiting while the previous batch runs), a batch holds at
most ``max_batch`` images, and ``workers`` batches run at once. The queue is bounded: when it is
full a request is refused at once (429 with Retry-After) instead of waiting into a timeout. A
request whose client has gone (its future cancelled) or whose deadline has passed is dropped
before it costs an inference.

The batching itself runs on the model's worker threads, which take requests from a thread-safe
queue: the event loop only puts a request in and, once per batch, hands the rows back. An asyncio
task that gathered batches and sent them through an executor cost the loop more than LeNet-5's
inference (measured: the executor's submit and wake-ups held the loop thread about 30% of the
time at 8 clients).

A request may bring the call that decodes its image instead of the pixels: the worker decodes it
just before the batch runs. That saves CPU-bound models a hop through another thread (measured: 7
to 12% more small JPEGs on EfficientNet-Lite0), and a request dropped unrun is never decoded.

Two shortcuts, both decided by app/sizing.py from the model's measured speed:

- a batch that is all there is in flight, here and in the other server processes
  (app/serving/activity.py), runs on ``run_alone``, a session with every core's threads: one user
  at a time gets every core instead of one;
- a model faster than a thread hop (LeNet-5) runs a small batch at once on the event loop
  (``inline_batch``), with no queue, no worker and no wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app import tracing
from app.metrics import Metrics
from app.serving.activity import Activity
from app.serving.errors import DeadlineExceeded, Overloaded


class Stop:
    """Put once per worker thread to end it. Not None, which means "nothing carried over" in the
    worker's loop: a stop taken while gathering a batch must survive to end the thread."""


STOP = Stop()


Work = np.ndarray | Callable[[], np.ndarray]
"""A batch of images, or the call that decodes one image into a batch of one."""


@dataclass
class Pending:
    """A request's images (or the call that decodes them), and the future (of the loop that waits
    on it) that gets its rows."""

    work: Work
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop
    deadline: float
    queued: float = field(default_factory=time.perf_counter)
    trace: tracing.Waiting | None = None  # its request's trace, when tracing is on

    @property
    def images(self) -> int:
        return 1 if callable(self.work) else len(self.work)


@dataclass
class Job:
    """Other work for the model's threads (feature maps, CAM), run alone, so that what runs at once
    on a model never exceeds its workers. Dropped unrun, like a request, once its waiter has gone or
    its deadline has passed."""

    call: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    deadline: float


def _settle(future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """On the future's loop: its result, unless the waiter has gone meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback, *args)


class Ticket:
    """One admitted request's share of its model's capacity, in images."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.cost = 0

    def charge(self, cost: int) -> None:
        """Makes the request's share ``cost``, or raises Overloaded (leaving it as it was) if the
        model cannot hold that much more."""
        extra = cost - self.cost
        self.batcher.check_room(extra)
        self.batcher.admitted += extra
        self.cost = cost


class Batcher:
    def __init__(
        self,
        name: str,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int,
        max_delay: float,
        max_queue: int,
        workers: int,
        capacity: int,
        metrics: Metrics,
        run_alone: Callable[[np.ndarray], np.ndarray] | None = None,
        activity: Activity | None = None,
        inline_batch: int = 0,
        provider: str = "",
        run_parts: Callable[[list[np.ndarray]], np.ndarray] | None = None,
    ) -> None:
        self.name = name
        self.provider = provider  # the execution provider its session got, for traces
        self.run = run
        self.run_alone = run_alone  # every core's threads, for a batch alone on the machine
        self.run_parts = run_parts  # run, taking the requests' images unjoined
        self.activity = activity or Activity()
        self.inline_batch = inline_batch  # batches up to this size run on the caller's thread
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.workers = workers
        self.capacity = capacity  # images admitted at once: app/sizing.py decides
        self.metrics = metrics
        self.observe_queue = metrics.queue_seconds.labels(name).observe
        self.set_depth = metrics.queue_depth.labels(name).set
        self.observe_inference = metrics.inference.labels(name).observe
        self.observe_batch = metrics.batch_size.labels(name).observe
        self.inbox: queue.SimpleQueue[Pending | Job | Stop] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.seconds_per_batch = 0.05  # refined by measurement; sizes Retry-After
        self.admitted = 0

    def submit(self, work: Work, timeout: float) -> asyncio.Future[np.ndarray]:
        """Queues ``work`` (one image, several from the V2 protocol, or the call that decodes one);
        the future gets its rows of the model's output, or the decoder's error. Raises Overloaded
        at once when the queue is full."""
        if not callable(work) and len(work) <= self.inline_batch:
            return self._run_inline(work)
        self._start()
        if self.inbox.qsize() >= self.max_queue:
            self.metrics.rejected.labels(self.name).inc()
            raise Overloaded(self.name, self.retry_after())
        loop = asyncio.get_running_loop()
        pending = Pending(work, loop.create_future(), loop, time.perf_counter() + timeout, trace=tracing.waiting())
        self.inbox.put(pending)
        return pending.future

    def call(self, function: Callable[[], Any], timeout: float) -> asyncio.Future[Any]:
        """``function()`` on one of this model's worker threads, alone; cancelling the future
        drops it if it has not started. Bounded by admission(), not by the queue: the service
        holds a request's admission while its job waits."""
        self._start()
        loop = asyncio.get_running_loop()
        job = Job(function, loop.create_future(), loop, time.perf_counter() + timeout)
        self.inbox.put(job)
        return job.future

    @contextmanager
    def admission(self, cost: int = 1) -> Iterator[Ticket]:
        """Counts a request from before its body is read until it is answered, so that a burst is
        refused at the door (429) instead of piling up in the decoder, where no queue bound would
        limit its latency: measured with 64 clients sending 12-megapixel photos, p99 was 0.9 s
        without this. ``cost`` is the request's share of ``capacity`` in images; the ticket can
        raise it once the request's size is known."""
        ticket = Ticket(self)
        ticket.charge(cost)
        self.activity.enter()
        try:
            yield ticket
        finally:
            self.admitted -= ticket.cost
            self.activity.leave()

    def check_room(self, cost: int) -> None:
        """Raises Overloaded, and counts the refusal, unless ``cost`` more images fit in the
        capacity; admits nothing (``admission`` does)."""
        if self.admitted + cost > self.capacity:
            self.metrics.rejected.labels(self.name).inc()
            raise Overloaded(self.name, self.retry_after())

    def retry_after(self) -> int:
        backlog = self.inbox.qsize() / (self.max_batch * self.workers)
        return max(1, round(backlog * self.seconds_per_batch + 0.5))

    def _start(self) -> None:
        if not self.threads:
            self.threads = [
                threading.Thread(target=self._serve, name=f"infer-{self.name}-{i}", daemon=True)
                for i in range(self.workers)
            ]
            for thread in self.threads:
                thread.start()

    async def close(self) -> None:
        """Ends the worker threads after the batch each is running; what is still queued is cancelled."""
        for _ in self.threads:
            self.inbox.put(STOP)
        threads = self.threads

        def join_all() -> None:
            for thread in threads:
                thread.join()

        await asyncio.to_thread(join_all)
        self.threads = []
        while not self.inbox.empty():
            item = self.inbox.get_nowait()
            if not isinstance(item, Stop):
                _post(item.loop, item.future.cancel)

    def _serve(self) -> None:
        carried: Pending | Job | Stop | None = None
        while True:
            first = carried if carried is not None else self.inbox.get()
            carried = None
            if isinstance(first, Stop):
                return
            if isinstance(first, Job):
                self._run_job(first)
                continue
            taken, carried = self._gather(first)
            live = self._live(taken)
            if live:
                self._run(live)

    def _gather(self, first: Pending) -> tuple[list[Pending], Pending | Job | Stop | None]:
        """``first`` and what joins it: what is waiting now, or arrives within max_delay of
        ``first``, up to max_batch images. Returns the batch and an item that did not fit (a
        larger request then runs alone, as the first of the next batch)."""
        taken, images = [first], first.images
        until = first.queued + self.max_delay
        while images < self.max_batch:
            wait = until - time.perf_counter()
            try:
                item = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, Pending) or images + item.images > self.max_batch:
                return taken, item
            taken.append(item)
            images += item.images
        return taken, None

    def _live(self, taken: list[Pending]) -> list[Pending]:
        """Drops, unrun, the requests whose client has gone and those past their deadline."""
        live, now = [], time.perf_counter()
        for pending in taken:
            if pending.future.done():
                self.metrics.dropped.labels(self.name, "client gone").inc()
            elif now > pending.deadline:
                self.metrics.dropped.labels(self.name, "deadline").inc()
                error = DeadlineExceeded(f"waited past its deadline for model {self.name!r}")
                _post(pending.loop, _settle, pending.future, None, error)
            else:
                self.observe_queue(now - pending.queued)
                live.append(pending)
        self.set_depth(self.inbox.qsize())
        return live

    def _decoded(self, live: list[Pending]) -> list[tuple[Pending, np.ndarray]]:
        """Each request of ``live`` with its images, decoded here where it brought the call that
        decodes them; a request whose image is refused gets that error alone."""
        decoded = []
        for pending in live:
            try:
                images = pending.work() if callable(pending.work) else pending.work
            except Exception as error:
                _post(pending.loop, _settle, pending.future, None, error)
                continue
            decoded.append((pending, images))
        return decoded

    def _run(self, taken: list[Pending]) -> None:
        taken_at = tracing.now()
        live = self._decoded(taken)
        if not live:
            return
        decoded_at = tracing.now()
        started = time.perf_counter()
        try:
            images = sum(len(rows) for _, rows in live)
            output = self._infer([rows for _, rows in live])
        except Exception as error:  # each waiting request gets the model's failure
            for pending, _ in live:
                _post(pending.loop, _settle, pending.future, None, error)
            return
        elapsed = time.perf_counter() - started
        self.seconds_per_batch = 0.8 * self.seconds_per_batch + 0.2 * elapsed
        self.observe_inference(elapsed)
        self.observe_batch(images)
        if taken_at:  # recorded before the answers go back, so that a request's trace is whole when it ends
            traces = [(pending.trace, callable(pending.work)) for pending, _ in live]
            self._trace(images, traces, taken_at, decoded_at)
        _post(live[0][0].loop, self._hand_back, live, output)

    def _run_inline(self, batch: np.ndarray) -> asyncio.Future[np.ndarray]:
        """``batch`` run now, on the caller's thread (the event loop): the future is already done."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        taken_at = tracing.now()
        started = time.perf_counter()
        try:
            output = self.run(batch)
        except Exception as error:
            future.set_exception(error)
            return future
        self.observe_inference(time.perf_counter() - started)
        self.observe_batch(len(batch))
        if taken_at:
            self._trace(len(batch), [(tracing.waiting(), False)], taken_at, taken_at)
        future.set_result(output)
        return future

    def _trace(
        self, images: int, requests: list[tuple[tracing.Waiting | None, bool]], taken: int, decoded: int
    ) -> None:
        times = tracing.BatchTimes(taken, decoded, tracing.now())
        tracing.record_batch(self.name, self.provider, images, requests, times)

    def _infer(self, parts: list[np.ndarray]) -> np.ndarray:
        """The model's rows for the requests' ``parts``: on every core's threads when nothing else
        is in flight. With ``run_parts`` (on an accelerator: fixed batch shapes, app/serving/runtime.py,
        or the shared feed, app/serving/feed.py) the parts are copied once, straight into the bound
        input or the shared memory, not joined here first."""
        if self.run_parts is not None:
            return self.run_parts(parts)
        batch = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if self.run_alone is not None and self.inbox.empty() and self.activity.alone(len(parts)):
            return self.run_alone(batch)
        return self.run(batch)

    @staticmethod
    def _hand_back(live: list[tuple[Pending, np.ndarray]], output: np.ndarray) -> None:
        """On the loop, once per batch: each request its own rows."""
        start = 0
        for pending, images in live:
            end = start + len(images)
            _settle(pending.future, output[start:end])
            start = end

    def _run_job(self, job: Job) -> None:
        if job.future.done():
            self.metrics.dropped.labels(self.name, "client gone").inc()
            return
        if time.perf_counter() > job.deadline:
            self.metrics.dropped.labels(self.name, "deadline").inc()
            error = DeadlineExceeded(f"waited past its deadline for model {self.name!r}")
            _post(job.loop, _settle, job.future, None, error)
            return
        try:
            result = job.call()
        except Exception as error:
            _post(job.loop, _settle, job.future, None, error)
        else:
            _post(job.loop, _settle, job.future, result)
