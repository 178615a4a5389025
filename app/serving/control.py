"""When models are loaded and unloaded while serving: CNNSERVE_MODEL_CONTROL.

- ``none``: every model at start, nothing after (no management API).
- ``explicit``: the models named by CNNSERVE_LOAD_MODELS at start, then what the repository API
  (``POST /v2/repository/models/{name}/load`` and ``.../unload``) asks for.
- ``poll``: every model at start, then the repository folder is looked at every
  CNNSERVE_POLL_INTERVAL_S: a new model folder is loaded, one whose files changed is reloaded,
  one that went is unloaded. The API works too.

Several server processes each hold every model, so each must see the same ones. In poll mode each
process looks at the folder itself: they agree within one interval. In explicit mode the process
that took the API call writes the wanted state (each model and how many times it was asked to load)
to a file the supervisor gives every process, with a generation number, and answers once every
process has applied that generation (each writes the generation it applied to its slot of a shared
array, app/process/topology.py); a process that starts later (a replacement) loads what the file
says, not what the settings said at start.

The API's calls in poll mode go through the same file, or a call would reach only the process the
kernel gave its connection to: a load counts as in explicit mode, and an unload is remembered with
the folder's signature, so that no process loads that folder again (at a poll, or when it starts)
until its files change or the API loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.config import Settings
from app.serving.errors import BadRequest, NotFound, ServingError
from app.serving.repository import Repository

log = logging.getLogger("cnnserve.control")

SYNC_POLL_SECONDS = 0.1  # how often a process looks for a new generation, and a caller for its peers
SYNC_TIMEOUT_SECONDS = 120.0  # the longest a load waits for the other processes to apply it
NOT_APPLIED = -1  # a process that is starting: nobody waits for it, it reads the state when it loads


@dataclass
class Shared:
    """The wanted state every server process applies (explicit mode, and the API's calls in poll
    mode, with several processes): a file and, per process, the generation it has applied (a
    ctypes array; NOT_APPLIED for a process that does not serve yet)."""

    state_file: Path
    applied: Any
    index: int

    def read(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        return {
            "generation": state.get("generation", 0),
            "models": state.get("models", {}),  # model -> loads asked for through the API
            "unloaded": state.get("unloaded", {}),  # poll mode: model -> its signature when unloaded
        }

    @contextlib.contextmanager
    def writing(self) -> Iterator[dict[str, Any]]:
        """The state, to change under an exclusive lock; written back (atomically) with its
        generation one higher."""
        lock_path = self.state_file.with_suffix(".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            yield state
            state["generation"] += 1
            scratch = self.state_file.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(json.dumps(state))
            scratch.replace(self.state_file)

    def everyone_applied(self, generation: int) -> bool:
        return all(applied >= generation or applied == NOT_APPLIED for applied in self.applied)


@dataclass
class ModelControl:
    settings: Settings
    repository: Repository
    shared: Shared | None = None
    applied: dict[str, int] = field(default_factory=dict)  # model -> load count applied (explicit)
    seen: dict[str, tuple[object, ...]] = field(default_factory=dict)  # model -> disk signature (poll)
    stepping: asyncio.Lock = field(default_factory=asyncio.Lock)  # a poll, a follow, or an API change and its record

    @property
    def managed(self) -> bool:
        """Whether the repository API is on."""
        return self.settings.model_control != "none"

    def load_initial(self) -> None:
        """At start (blocking): what the mode loads, or what the other processes serve now."""
        if self.settings.model_control == "poll":
            self._load_initial_polled()
            return
        if self.shared is not None and self.settings.model_control == "explicit":
            state = self.shared.read()
            if state["generation"] > 0:
                for name in state["models"]:
                    self.repository.load_or_refuse(name)
                self.applied = dict(state["models"])
                self.repository.loaded = True
                self.shared.applied[self.shared.index] = state["generation"]
                return
        self.repository.load_initial()
        if self.shared is not None:
            self.applied = self.started_with()
            self.shared.applied[self.shared.index] = 0

    def _load_initial_polled(self) -> None:
        """Poll mode: every model folder, but those the API unloaded whose files have not changed
        since (a replacement process must not serve what its peers stopped serving)."""
        state = self.shared.read() if self.shared is not None else self.shared_state_alone()
        for name in self.repository.names():
            self.seen[name] = self.repository.signature(name)
            if not unloaded_as_is(state, name, self.seen[name]):
                self.repository.load_or_refuse(name)
        self.applied = dict(state["models"])
        self.repository.loaded = True
        if self.shared is not None:
            self.shared.applied[self.shared.index] = state["generation"]

    @staticmethod
    def shared_state_alone() -> dict[str, Any]:
        """The state a process on its own starts with: nothing asked for through the API."""
        return {"generation": 0, "models": {}, "unloaded": {}}

    # -- the API -----------------------------------------------------------------------------

    async def load(self, name: str) -> None:
        """Loads or reloads ``name`` here and in every other process; raises
        BadRequest if it serves nothing new (the reason says why; what served before stays)."""
        self.require_managed()
        async with self.stepping:  # a poll or follow that read the state before the record would undo it
            retired = await asyncio.to_thread(self.repository.load, name)
            generation = self._record_load(name)
        await self.repository.retire(retired)
        if generation is not None:
            await self._wait_for_peers(generation)
        failures = self.repository.failed_versions.get(name, {})
        if name in self.repository.refused or failures:
            reasons = "; ".join(f"version {v}: {why}" if v else why for v, why in failures.items())
            raise BadRequest(f"failed to load {name!r}: {reasons or self.repository.refused[name].reason}")

    async def unload(self, name: str) -> None:
        """Unloads ``name`` here and in every other process; NotFound if it is not loaded here."""
        self.require_managed()
        async with self.stepping:  # as in ``load``
            retired = await asyncio.to_thread(self.repository.unload, name)
            generation = await self._record_unload(name)
        await self.repository.retire(retired)
        if generation is not None:
            await self._wait_for_peers(generation)

    def _record_load(self, name: str) -> int | None:
        """Writes a load of ``name`` to the shared state; returns its generation (None alone)."""
        if self.shared is None:
            return None
        with self.shared.writing() as state:
            self.seed(state)
            state["unloaded"].pop(name, None)
            state["models"][name] = state["models"].get(name, 0) + 1
            self.applied[name] = state["models"][name]
            generation: int = state["generation"] + 1
        return generation

    async def _record_unload(self, name: str) -> int | None:
        """Writes an unload of ``name`` to the shared state; returns its generation (None alone).
        In poll mode the folder stays: the state remembers not to load it again as it is."""
        if self.shared is None:
            return None
        polled = self.settings.model_control == "poll"
        signature = await asyncio.to_thread(self.repository.signature, name) if polled else ()
        with self.shared.writing() as state:
            self.seed(state)
            if polled:
                state["unloaded"][name] = plain(signature)
            else:
                state["models"].pop(name, None)
                self.applied.pop(name, None)
            generation: int = state["generation"] + 1
        return generation

    def started_with(self) -> dict[str, int]:
        """The models every process loaded at start (explicit mode), none of them asked for yet."""
        return {name: 0 for name in self.settings.load_model_list}

    def seed(self, state: dict[str, Any]) -> None:
        """The first change to the shared state starts from what every process loaded at start,
        so that a process that starts later (a replacement) loads those too."""
        if state["generation"] == 0 and self.settings.model_control == "explicit":
            state["models"] = self.started_with()

    def require_managed(self) -> None:
        if not self.managed:
            raise NotFound("the model repository API is off (CNNSERVE_MODEL_CONTROL=none)")

    async def _load_here(self, name: str) -> None:
        """Loads (or refuses) ``name`` in this process, as a poll or another process asked."""
        retired = await asyncio.to_thread(self.repository.load_or_refuse, name)
        await self.repository.retire(retired)

    async def _unload_here(self, name: str) -> None:
        retired = await asyncio.to_thread(self.repository.unload, name)
        await self.repository.retire(retired)

    async def _wait_for_peers(self, generation: int) -> None:
        """Applies the state here too (with what other processes were asked meanwhile), then
        waits until every serving process has."""
        assert self.shared is not None
        await self.follow_once()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SYNC_TIMEOUT_SECONDS
        while not self.shared.everyone_applied(generation):
            if loop.time() > deadline:
                raise ServingError("not every server process applied the change in time", status=503)
            await asyncio.sleep(SYNC_POLL_SECONDS)

    # -- watching --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: in poll mode, look at the folder every interval, and at once when
        another process was asked something through the API; in explicit mode with several
        processes, apply what another process was asked."""
        if self.settings.model_control == "poll":
            loop = asyncio.get_running_loop()
            due = loop.time() + self.settings.poll_interval_s
            while True:
                await asyncio.sleep(min(SYNC_POLL_SECONDS, self.settings.poll_interval_s))
                if loop.time() >= due or self.behind():
                    due = loop.time() + self.settings.poll_interval_s
                    await self._guarded(self.poll_once())
        elif self.settings.model_control == "explicit" and self.shared is not None:
            while True:
                await asyncio.sleep(SYNC_POLL_SECONDS)
                await self._guarded(self.follow_once())

    async def _guarded(self, step: Any) -> None:
        """One step; an error is logged, never the end of the watching."""
        try:
            await step
        except Exception:
            log.exception("model control step failed; trying again next interval")

    def behind(self) -> bool:
        """Whether the shared state has a generation this process has not applied."""
        shared = self.shared
        return shared is not None and shared.read()["generation"] > shared.applied[shared.index]

    async def poll_once(self) -> None:
        """Loads what appeared or changed, unloads what went; with several processes, also what
        another one was asked through the API (``unload``, ``load``)."""
        async with self.stepping:
            state = self.shared.read() if self.shared is not None else self.shared_state_alone()
            on_disk = set(self.repository.names())
            for name in sorted(set(self.seen) - on_disk):
                self.seen.pop(name)
                if self._holds(name):
                    log.info("model folder %s went: unloading it", name)
                    await self._unload_here(name)
            for name in sorted(on_disk):
                await self._poll_folder(name, state)
            if self.shared is not None:
                self.shared.applied[self.shared.index] = state["generation"]

    async def _poll_folder(self, name: str, state: dict[str, Any]) -> None:
        """Model folder ``name``: unloaded if the API unloaded it (and its files are as they were
        then), else loaded if it is new or changed or the API asked for it since the last look."""
        signature = await asyncio.to_thread(self.repository.signature, name)
        changed = self.seen.get(name) != signature
        asked = state["models"].get(name, 0) != self.applied.get(name, 0)
        self.seen[name], self.applied[name] = signature, state["models"].get(name, 0)
        if unloaded_as_is(state, name, signature):
            if self._holds(name):
                log.info("model %s was unloaded through the API in another process: unloading it", name)
                await self._unload_here(name)
        elif changed or asked:
            log.info("model folder %s is new or changed: loading it", name)
            await self._load_here(name)

    def _holds(self, name: str) -> bool:
        """Whether this process serves or refuses model ``name`` (either way, it can unload it)."""
        return name in self.repository.versions or name in self.repository.refused

    async def follow_once(self) -> None:
        """Applies a generation of the shared state this process has not applied yet."""
        assert self.shared is not None
        if self.settings.model_control == "poll":
            await self.poll_once()
            return
        async with self.stepping:
            await self._follow_explicit()

    async def _follow_explicit(self) -> None:
        assert self.shared is not None
        state = self.shared.read()
        if state["generation"] <= self.shared.applied[self.shared.index]:
            return
        wanted: dict[str, int] = state["models"]
        for name in sorted(set(self.applied) - set(wanted)):
            self.applied.pop(name)
            with contextlib.suppress(NotFound):
                await self._unload_here(name)
        for name, count in sorted(wanted.items()):
            if self.applied.get(name) != count:
                self.applied[name] = count
                await self._load_here(name)
        self.shared.applied[self.shared.index] = state["generation"]


def plain(signature: tuple[object, ...]) -> Any:
    """A signature as the shared state's JSON holds it (lists for tuples), to compare with it."""
    return json.loads(json.dumps(signature))


def unloaded_as_is(state: dict[str, Any], name: str, signature: tuple[object, ...]) -> bool:
    """Whether the API unloaded model ``name`` (poll mode) and its files are as they were then."""
    return name in state["unloaded"] and state["unloaded"][name] == plain(signature)
