"""The shared feed: server processes that decode hand their tensors to one inference owner per GPU.

On an accelerator one process cannot both decode and keep the GPU busy: with one server process an
H200 served a third of what bare ONNX Runtime runs, bound by that process's decoding and Python.
So every server process decodes and preprocesses its own requests (one per core, as on the CPU)
and hands each batch to the inference owner (app/serving/owner.py), which joins the batches of
all of them into the GPU's batch shapes and answers each by its request id.

The pixels never go through a pipe or pickle. The supervisor creates one memory region
(``memfd_create``: anonymous, never a file in /dev/shm, so that nothing can be left behind there
by a stop or a crash, and freed by the kernel when the last process holding it ends) and hands
its descriptor to every child. It holds, per server process (a *lane*), a few *slots*: a header
(state, request id, model, shape, deadline) and room for one batch's input and output. A client
writes its batch into a free slot (the one copy on its side) and rings the owner's doorbell (one
byte down a pipe: a byte cannot be torn, so a process killed mid-write leaves nothing half-said);
the owner copies the rows of every waiting slot straight into the bound input of its batch shape,
runs it, writes each slot's rows back, and rings that lane's answer pipe with the slot's number.

A slot's state only moves forward by its holder: FREE -> SUBMITTED (client) -> TAKEN -> DONE or
FAILED (owner) -> FREE (client). Each owner has a generation, bumped by the supervisor when it
replaces a dead one: a slot the dead owner had TAKEN fails with a retryable 503 (OwnerLost), one
it had not yet taken is handed to the replacement, and an owner only takes slots of its own
generation.

Known limit: a slot's data is written before its state, and the other process is trusted to see
them in that order, which x86 guarantees (TSO); an ARM host (NVIDIA Grace) may reorder the stores,
and would need a fence there. Not verified on ARM.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing import reduction
from typing import Any

import numpy as np

from app.serving.errors import DeadlineExceeded, Unavailable

log = logging.getLogger("cnnserve.feed")

FREE, SUBMITTED, TAKEN, DONE, FAILED = range(5)
INFER, LOAD = 1, 2
FAILED_MODEL, FAILED_DEADLINE, FAILED_REFUSED = 1, 2, 3
KEY_BYTES = 512
OUTPUT_BYTES = 1 << 20  # of each slot: the rows of its batch, or the owner's message
PAGE = 4096
POLL_SECONDS = 0.05  # how often a waiting client looks at the owner's generation
ANSWER_GRACE_SECONDS = 2.0  # past a request's deadline, how long a client waits for the owner's own refusal

SLOT = np.dtype(
    [
        ("state", "<i4"),
        ("generation", "<i4"),
        ("kind", "<i4"),
        ("failure", "<i4"),
        ("request", "<i8"),
        ("answered", "<i8"),
        ("deadline", "<f8"),
        ("shape", "<i4", (4,)),
        ("out_shape", "<i4", (2,)),
        ("message_bytes", "<i4"),
        ("key", f"S{KEY_BYTES}"),
    ]
)
CONTROL = np.dtype([("generation", "<i4"), ("pid", "<i4")])  # per owner, written by the supervisor


class OwnerLost(Unavailable):
    """The inference owner died holding this request's batch: a retry goes to its replacement."""

    def __init__(self) -> None:
        super().__init__(
            "the inference process was replaced while it held this request; retry", headers={"Retry-After": "1"}
        )


class FeedRefused(Exception):
    """The owner could not serve the model (load or check failed), with its reason."""


class Fd:
    """A file descriptor that travels to a spawned child (as the supervisor's sockets do): pickled
    while a process starts, it is passed to the child, which gets its own copy."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (Fd.rebuild, (reduction.DupFd(self.fd),))

    @staticmethod
    def rebuild(duplicate: Any) -> Fd:
        return Fd(duplicate.detach())


@dataclass(frozen=True)
class Layout:
    """Where everything lies in the region: the owners' control words, then every slot's header,
    then every slot's data (input, then OUTPUT_BYTES of output)."""

    owners: int
    lanes: int
    slots: int  # per lane
    slot_bytes: int  # input and output of one slot

    @property
    def headers_at(self) -> int:
        return self.owners * CONTROL.itemsize

    @property
    def data_at(self) -> int:
        end = self.headers_at + self.lanes * self.slots * SLOT.itemsize
        return -(-end // PAGE) * PAGE

    @property
    def size(self) -> int:
        return self.data_at + self.lanes * self.slots * self.slot_bytes

    @property
    def input_bytes(self) -> int:
        return self.slot_bytes - OUTPUT_BYTES

    def owner_of(self, lane: int) -> int:
        return lane % self.owners

    def data(self, region: mmap.mmap, slot: int) -> tuple[memoryview, memoryview]:
        """Slot ``slot``'s (of all lanes') input and output areas."""
        start = self.data_at + slot * self.slot_bytes
        view = memoryview(region)
        return view[start : start + self.input_bytes], view[start + self.input_bytes : start + self.slot_bytes]


def mapped(layout: Layout, memory: Fd) -> tuple[mmap.mmap, np.ndarray, np.ndarray]:
    """The region, its owners' control words and every slot's header, as shared numpy views."""
    region = mmap.mmap(memory.fd, layout.size)
    control = np.ndarray((layout.owners,), CONTROL, buffer=region, offset=0)
    headers = np.ndarray((layout.lanes * layout.slots,), SLOT, buffer=region, offset=layout.headers_at)
    return region, control, headers


@dataclass
class Lane:
    """What one server process needs: the region, its lane, its owner's doorbell and its answers."""

    layout: Layout
    memory: Fd
    index: int
    doorbell: Fd  # write end: one byte per submission
    answers: Fd  # read end: one byte (the slot within the lane) per answer


@dataclass
class OwnerEnds:
    """What one inference owner needs: the region, its doorbell and its lanes' answer pipes."""

    layout: Layout
    memory: Fd
    index: int
    doorbell: Fd  # read end
    answers: dict[int, Fd]  # write ends, by lane


@dataclass
class Feed:
    """The region and pipes of a deployment, made by the supervisor before its children start."""

    layout: Layout
    memory: Fd
    doorbells: list[tuple[Fd, Fd]]  # per owner: read, write
    answers: list[tuple[Fd, Fd]]  # per lane: read, write

    @classmethod
    def create(cls, owners: int, lanes: int, slots: int, slot_bytes: int) -> Feed:
        layout = Layout(owners, lanes, slots, max(slot_bytes, OUTPUT_BYTES + PAGE))
        memory = os.memfd_create("cnnserve-feed", os.MFD_CLOEXEC)
        os.ftruncate(memory, layout.size)  # pages cost memory only once written
        return cls(layout, Fd(memory), [pipe() for _ in range(owners)], [pipe() for _ in range(lanes)])

    def lane(self, index: int) -> Lane:
        doorbell = self.doorbells[self.layout.owner_of(index)][1]
        return Lane(self.layout, self.memory, index, doorbell, self.answers[index][0])

    def owner(self, index: int) -> OwnerEnds:
        lanes = {
            lane: self.answers[lane][1] for lane in range(self.layout.lanes) if self.layout.owner_of(lane) == index
        }
        return OwnerEnds(self.layout, self.memory, index, self.doorbells[index][0], lanes)

    def replaced_owner(self, index: int) -> int:
        """The generation of the owner that replaces ``index``; a slot the dead one held now fails."""
        region, control, _ = mapped(self.layout, self.memory)
        control[index]["generation"] += 1
        generation = int(control[index]["generation"])
        del control
        region.close()
        return generation

    def close(self) -> None:
        for fd in [self.memory, *itertools.chain(*self.doorbells), *itertools.chain(*self.answers)]:
            os.close(fd.fd)


def pipe() -> tuple[Fd, Fd]:
    """A pipe whose write end never blocks: a full pipe already says everything a byte would."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    return Fd(read), Fd(write)


def ring(fd: Fd, byte: int = 0) -> None:
    with contextlib.suppress(BlockingIOError):
        os.write(fd.fd, bytes((byte,)))


def encode_key(name: str, version: str, folder: str, sha256: str) -> bytes:
    """What the owner needs to find, load and tell apart a model (a changed file is another key)."""
    key = "\x1f".join((name, version, sha256, folder)).encode()
    if len(key) > KEY_BYTES:
        raise FeedRefused(f"the model's folder path is too long for the feed ({len(key)} > {KEY_BYTES} bytes)")
    return key


def decode_key(key: bytes) -> tuple[str, str, str, str]:
    name, version, sha256, folder = key.decode().split("\x1f")
    return name, version, sha256, folder


@dataclass(frozen=True)
class Loaded:
    """The owner's answer to a load: the provider the model got there, and how it runs."""

    provider: str
    description: str


class FeedClient:
    """A server process's end of the feed: ``run`` is its batcher's call, from its worker threads.
    A lane has as many slots as the process has workers; each call holds one slot until answered."""

    def __init__(self, lane: Lane) -> None:
        self.lane, self.layout = lane, lane.layout
        self.region, self.control, headers = mapped(lane.layout, lane.memory)
        first = lane.index * self.layout.slots
        self.headers = headers[first : first + self.layout.slots]
        self.first = first
        self.headers["state"] = FREE  # a replaced process's lane: whatever the dead one left
        self.headers["request"] = 0
        self.owner = self.layout.owner_of(lane.index)
        self.events = [threading.Event() for _ in range(self.layout.slots)]
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(self.layout.slots):
            self.free.put(slot)
        self.ids = itertools.count((os.getpid() << 24) + 1)
        threading.Thread(target=self._receive, name="feed-answers", daemon=True).start()

    def _receive(self) -> None:
        """Wakes the caller waiting on each slot the owner answers (callers also look every
        POLL_SECONDS, so a wake-up lost with a closed pipe costs time, not an answer)."""
        while True:
            try:
                answered = os.read(self.lane.answers.fd, 4096)
            except OSError:
                return
            for slot in answered:
                if slot < len(self.events):
                    self.events[slot].set()

    def load(self, key: bytes, timeout: float) -> Loaded:
        """Asks the owner to load (and warm) the model, waiting until it has; FeedRefused if it cannot."""
        message = self._call(LOAD, key, [np.zeros((0, 0, 0, 0), np.float32)], timeout)
        provider, _, description = message.decode().partition("\n")
        return Loaded(provider, description)

    def run(self, key: bytes, parts: list[np.ndarray], timeout: float) -> np.ndarray:
        """The model's rows for ``parts`` (several requests' images), from the owner: written
        straight into a slot (one copy); more than a slot holds goes in several."""
        images = sum(len(part) for part in parts)
        rows = max(1, self.layout.input_bytes // max(1, parts[0][0].nbytes if images else 1))
        if images <= rows:
            return self._infer(key, parts, timeout)
        batch = np.concatenate(parts)
        return np.concatenate([self._infer(key, [batch[at : at + rows]], timeout) for at in range(0, images, rows)])

    def _infer(self, key: bytes, parts: list[np.ndarray], timeout: float) -> np.ndarray:
        rows: np.ndarray = self._call(INFER, key, parts, timeout)
        return rows

    def _call(self, kind: int, key: bytes, parts: list[np.ndarray], timeout: float) -> Any:
        slot = self.free.get()
        try:
            request = self._submit(slot, kind, key, parts, timeout)
            self._wait(slot, request, time.monotonic() + timeout + ANSWER_GRACE_SECONDS)
            return self._answer(slot, kind)
        finally:
            self.headers[slot]["state"] = FREE
            self.events[slot].clear()
            self.free.put(slot)

    def _submit(self, slot: int, kind: int, key: bytes, parts: list[np.ndarray], timeout: float) -> int:
        header, request = self.headers[slot], next(self.ids)
        inputs, _ = self.layout.data(self.region, self.first + slot)
        at = 0
        for part in parts:
            np.frombuffer(inputs, np.float32, part.size, at * 4).reshape(part.shape)[:] = part
            at += part.size
        header["kind"], header["key"], header["request"], header["answered"] = kind, key, request, 0
        header["shape"] = (sum(len(part) for part in parts), *parts[0].shape[1:], 0, 0, 0, 0)[:4]
        header["deadline"] = time.monotonic() + timeout
        header["generation"] = self.control[self.owner]["generation"]
        header["state"] = SUBMITTED  # last: the owner takes nothing half-written
        ring(self.lane.doorbell)
        return request

    def _wait(self, slot: int, request: int, give_up: float) -> None:
        """Until the owner answers ``request``; a slot the owner died holding raises OwnerLost, one
        it had not taken yet goes to its replacement."""
        header, event = self.headers[slot], self.events[slot]
        while True:
            event.wait(POLL_SECONDS)
            event.clear()
            state = int(header["state"])
            if state in (DONE, FAILED) and int(header["answered"]) == request:
                return
            generation = self.control[self.owner]["generation"]
            if generation != header["generation"]:
                if state == TAKEN:
                    raise OwnerLost()
                header["generation"] = generation
                ring(self.lane.doorbell)
            if time.monotonic() > give_up:
                raise DeadlineExceeded("the inference process did not answer within the request's deadline")

    def _answer(self, slot: int, kind: int) -> np.ndarray | bytes:
        header = self.headers[slot]
        _, output = self.layout.data(self.region, self.first + slot)
        if int(header["state"]) == FAILED:
            message = bytes(output[: int(header["message_bytes"])]).decode()
            failure = int(header["failure"])
            if failure == FAILED_DEADLINE:
                raise DeadlineExceeded(message)
            raise FeedRefused(message) if failure == FAILED_REFUSED else RuntimeError(message)
        if kind == LOAD:
            return bytes(output[: int(header["message_bytes"])])
        rows, width = (int(n) for n in header["out_shape"])
        return np.frombuffer(output, np.float32, rows * width).reshape(rows, width).copy()
