"""The inference owner: the one process per GPU that runs every server process's batches.

It waits on its doorbell, takes every slot submitted to it (app/serving/feed.py), and, model by
model, packs the slots' rows into the smallest batch shape that holds them (up to the largest),
copying each slot's rows straight into that shape's bound input; the rows come back into each
slot's output, and its lane's answer pipe wakes the server process. A request past its deadline
is refused unrun, as the batcher would.

Models load when a server process asks (``LOAD``, at its own load, so that /readyz waits for the
GPU's warm-up too) or, after the owner was replaced, at the first request that names one. A load
runs in the owner's one loop: other models wait meanwhile, which only happens at start, on a
change of models, or after a replacement.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from app.config import Settings
from app.serving import accelerated, loader
from app.serving.feed import (
    DONE,
    FAILED,
    FAILED_DEADLINE,
    FAILED_MODEL,
    FAILED_REFUSED,
    LOAD,
    SUBMITTED,
    TAKEN,
    OwnerEnds,
    decode_key,
    mapped,
    ring,
)
from app.serving.runtime import ShapedRunner

log = logging.getLogger("cnnserve.owner")

WAKE_SECONDS = 0.5  # the longest the owner sleeps without a doorbell (it looks at the slots anyway)


@dataclass(frozen=True)
class Taken:
    """A slot this owner took, and the request it held then."""

    slot: int
    request: int
    images: int
    deadline: float = 0.0


class Owner:
    def __init__(self, settings: Settings, ends: OwnerEnds, generation: int) -> None:
        self.settings, self.ends, self.generation = settings, ends, generation
        self.layout = ends.layout
        self.region, self.control, self.headers = mapped(ends.layout, ends.memory)
        slots = self.layout.slots
        self.mine = np.array([lane * slots + s for lane in sorted(ends.answers) for s in range(slots)], np.int64)
        self.models: dict[bytes, accelerated.Shaped | str] = {}  # by key: ready, or the reason it is refused
        self.control[ends.index]["pid"] = os.getpid()
        self.lock = threading.Lock()  # one thread takes slots (and loads models) at a time
        self.local = threading.local()  # each thread's runners: buffers of its own on the shared sessions
        os.set_blocking(ends.doorbell.fd, False)

    def serve(self, stop: threading.Event, threads: int = 1) -> None:
        """Answers until ``stop`` is set, on ``threads`` threads: with two, one batch is copied in
        and answered while the other runs (ONNX Runtime releases the GIL while it runs)."""
        workers = [threading.Thread(target=self.loop, args=(stop,), daemon=True) for _ in range(threads - 1)]
        for worker in workers:
            worker.start()
        self.loop(stop)
        for worker in workers:
            worker.join()

    def loop(self, stop: threading.Event) -> None:
        doorbell = self.ends.doorbell.fd
        while not stop.is_set():
            ready, _, _ = select.select([doorbell], [], [], WAKE_SECONDS)
            if ready:
                with contextlib.suppress(BlockingIOError):  # another thread read it first
                    os.read(doorbell, 65536)
            self.step()

    def step(self) -> None:
        """Everything submitted so far: loads, refusals past their deadline, then batches by model."""
        by_model: dict[bytes, list[Taken]] = {}
        now = time.monotonic()
        with self.lock:
            for taken in self.take():
                header = self.headers[taken.slot]
                key = bytes(header["key"])
                if int(header["kind"]) == LOAD:
                    self.answer_load(taken, key)
                elif float(header["deadline"]) < now:
                    self.fail(taken, FAILED_DEADLINE, f"waited past its deadline for model {decode_key(key)[0]!r}")
                else:
                    by_model.setdefault(key, []).append(taken)
            models = {key: self.model(key) for key in by_model}
        for key, slots in by_model.items():
            self.infer(key, models[key], slots)

    def take(self) -> list[Taken]:
        """The slots of this owner's lanes submitted to this generation, marked TAKEN, oldest first."""
        headers = self.headers[self.mine]
        ready = self.mine[(headers["state"] == SUBMITTED) & (headers["generation"] == self.generation)]
        taken = []
        for slot in ready:
            header = self.headers[slot]
            header["state"] = TAKEN
            shape = header["shape"]
            taken.append(Taken(int(slot), int(header["request"]), int(shape[0]), float(header["deadline"])))
        return sorted(taken, key=lambda t: t.deadline)  # every request has the same timeout: oldest first

    def model(self, key: bytes) -> accelerated.Shaped | str:
        """The model ``key`` names, loaded now if it is not yet; or the reason it cannot be. A new
        copy of a model's files (another sha256, poll mode) replaces the old one here."""
        if key not in self.models:
            for old in [other for other in self.models if same_model(other, key)]:
                del self.models[old]
            self.models[key] = self.load(key)
        return self.models[key]

    def load(self, key: bytes) -> accelerated.Shaped | str:
        name, version, sha256, folder = decode_key(key)
        started = time.perf_counter()
        try:
            shaped = load_model(Path(folder), name, sha256, self.settings, self.ends.index)
        except (loader.ModelRefused, accelerated.Refused) as error:
            log.error("inference process: model %s version %s refused: %s", name, version, error)
            return str(error)
        except Exception as error:  # whatever else a load raises refuses the model, not the process
            log.exception("inference process: model %s version %s failed to load", name, version)
            return f"the inference process could not load it: {error!r}"
        took = time.perf_counter() - started
        log.info(
            "inference process %d: loaded model %s version %s, %s, in %.2f s",
            os.getpid(),
            name,
            version,
            shaped.describe(),
            took,
        )
        return shaped

    def answer_load(self, taken: Taken, key: bytes) -> None:
        model = self.model(key)
        if isinstance(model, str):
            self.fail(taken, FAILED_REFUSED, model)
        else:
            self.finish(taken, message=f"{model.provider}\n{model.describe()}")

    def infer(self, key: bytes, model: accelerated.Shaped | str, slots: list[Taken]) -> None:
        if isinstance(model, str):
            for taken in slots:
                self.fail(taken, FAILED_REFUSED, model)
            return
        runner = self.runner(key, model)
        for group in pack(slots, runner.largest):
            try:
                self.run_group(runner, group)
            except Exception as error:  # the model's failure goes to each request of the group
                log.exception("inference process: a batch of model %s failed", decode_key(key)[0])
                for taken in group:
                    self.fail(taken, FAILED_MODEL, f"inference failed: {error}")

    def runner(self, key: bytes, model: accelerated.Shaped) -> ShapedRunner:
        """This thread's runner of the model: the loaded one's sessions, buffers of its own."""
        runners: dict[bytes, ShapedRunner] = self.local.__dict__.setdefault("runners", {})
        if key not in runners:
            for gone in [k for k in runners if k not in self.models]:  # replaced by a new copy
                del runners[gone]
            runners[key] = model.runner.clone()
        return runners[key]

    def run_group(self, runner: ShapedRunner, group: list[Taken]) -> None:
        """One run of the group's rows at the shape that holds them (a slot larger than the
        largest shape runs alone, in chunks)."""
        parts = [self.rows(taken) for taken in group]
        if len(group) == 1 and group[0].images > runner.largest:
            self.finish(group[0], rows=runner.run(parts[0]))  # run() holds the runner's lock itself
            return
        with runner.lock:
            output = runner.run_parts(parts)
            at = 0
            for taken, part in zip(group, parts, strict=True):
                self.finish(taken, rows=output[at : at + len(part)])
                at += len(part)

    def rows(self, taken: Taken) -> np.ndarray:
        """The slot's input rows, read in place."""
        shape = tuple(int(n) for n in self.headers[taken.slot]["shape"])
        inputs, _ = self.layout.data(self.region, taken.slot)
        return np.frombuffer(inputs, np.float32, int(np.prod(shape))).reshape(shape)

    def finish(self, taken: Taken, rows: np.ndarray | None = None, message: str = "") -> None:
        header = self.headers[taken.slot]
        if not self.still_holds(taken):
            return
        _, output = self.layout.data(self.region, taken.slot)
        if rows is not None:
            np.frombuffer(output, np.float32, rows.size)[:] = rows.reshape(-1)
            header["out_shape"] = rows.shape
        else:
            encoded = message.encode()[: len(output)]
            output[: len(encoded)] = encoded
            header["message_bytes"] = len(encoded)
        self.answer(taken, DONE)

    def fail(self, taken: Taken, failure: int, message: str) -> None:
        if not self.still_holds(taken):
            return
        header = self.headers[taken.slot]
        _, output = self.layout.data(self.region, taken.slot)
        encoded = message.encode()[: len(output)]
        output[: len(encoded)] = encoded
        header["message_bytes"], header["failure"] = len(encoded), failure
        self.answer(taken, FAILED)

    def still_holds(self, taken: Taken) -> bool:
        """Whether the slot still waits for this answer: a server process replaced meanwhile has
        reset its lane, and its new requests are not this one."""
        header = self.headers[taken.slot]
        return int(header["state"]) == TAKEN and int(header["request"]) == taken.request

    def answer(self, taken: Taken, state: int) -> None:
        header = self.headers[taken.slot]
        header["answered"] = taken.request
        header["state"] = state
        lane, slot = divmod(taken.slot, self.layout.slots)
        ring(self.ends.answers[lane], slot)


def same_model(key: bytes, other: bytes) -> bool:
    """Whether two keys name the same model version in the same folder (their files may differ)."""
    name, version, _, folder = decode_key(key)
    their_name, their_version, _, their_folder = decode_key(other)
    return (name, version, folder) == (their_name, their_version, their_folder)


def pack(slots: list[Taken], largest: int) -> list[list[Taken]]:
    """Slots in order, grouped so that each group's images fit the largest shape; a slot larger
    than it is a group of its own."""
    groups: list[list[Taken]] = []
    images = largest + 1
    for taken in slots:
        if images + taken.images > largest:
            groups.append([])
            images = 0
        groups[-1].append(taken)
        images += taken.images
    return groups


def load_model(folder: Path, name: str, sha256: str, settings: Settings, device: int) -> accelerated.Shaped:
    """The model in ``folder`` as the server process checked it (the same sha256), built for this
    owner's GPU; raises loader.ModelRefused or accelerated.Refused."""
    spec = loader.read_spec(folder, name)
    if spec.sha256 != sha256:
        raise loader.ModelRefused(f"model.json changed while loading (sha256 {spec.sha256}, expected {sha256})")
    settings = settings.model_copy(update=spec.serving.given())
    proto = loader.parse_onnx(loader.read_verified(loader.own_file(folder, "model.onnx"), spec.sha256))
    if loader.check_external_data(proto, folder):
        onnx.external_data_helper.load_external_data_for_model(proto, str(folder))
    shaped = accelerated.build(proto, folder, spec, settings, device)
    loader.check_signature(spec, shaped.runner.bound[shaped.runner.largest].session)
    return shaped
