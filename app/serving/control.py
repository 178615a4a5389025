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
    """The wanted state every server process applies (explicit mode, several processes): a file
    and, per process, the generation it has applied (a ctypes array; NOT_APPLIED for a process
    that does not serve yet)."""

    state_file: Path
    applied: Any
    index: int

    def read(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        return {"generation": state.get("generation", 0), "models": state.get("models", {})}

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

    @property
    def managed(self) -> bool:
        """Whether the repository API is on."""
        return self.settings.model_control != "none"

    def load_initial(self) -> None:
        """At start (blocking): what the mode loads, or what the other processes serve now."""
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
            self.shared.applied[self.shared.index] = 0
        if self.settings.model_control == "poll":
            self.seen = {name: self.repository.signature(name) for name in self.repository.names()}

    # -- the API -----------------------------------------------------------------------------

    async def load(self, name: str) -> None:
        """Loads or reloads ``name`` here and, in explicit mode, in every process; raises
        BadRequest if it serves nothing new (the reason says why; what served before stays)."""
        self.require_managed()
        await self._load_here(name)
        if self.shared is not None and self.settings.model_control == "explicit":
            with self.shared.writing() as state:
                state["models"][name] = state["models"].get(name, 0) + 1
                self.applied[name] = state["models"][name]
                generation = state["generation"] + 1
            await self._wait_for_peers(generation)
        failures = self.repository.failed_versions.get(name, {})
        if name in self.repository.refused or failures:
            reasons = "; ".join(f"version {v}: {why}" if v else why for v, why in failures.items())
            raise BadRequest(f"failed to load {name!r}: {reasons or self.repository.refused[name].reason}")

    async def unload(self, name: str) -> None:
        self.require_managed()
        await self._unload_here(name)
        if self.shared is not None and self.settings.model_control == "explicit":
            with self.shared.writing() as state:
                state["models"].pop(name, None)
                generation = state["generation"] + 1
            self.applied.pop(name, None)
            await self._wait_for_peers(generation)

    def require_managed(self) -> None:
        if not self.managed:
            raise NotFound("the model repository API is off (CNNSERVE_MODEL_CONTROL=none)")

    async def _load_here(self, name: str) -> None:
        retired = await asyncio.to_thread(self.repository.load, name)
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
        """Until cancelled: in poll mode, look at the folder every interval; in explicit mode
        with several processes, apply what another process was asked."""
        if self.settings.model_control == "poll":
            while True:
                await asyncio.sleep(self.settings.poll_interval_s)
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

    async def poll_once(self) -> None:
        """Loads what appeared or changed, unloads what went."""
        on_disk = set(self.repository.names())
        for name in sorted(set(self.seen) - on_disk):
            self.seen.pop(name)
            if name in self.repository.versions or name in self.repository.refused:
                log.info("model folder %s went: unloading it", name)
                await self._unload_here(name)
        for name in sorted(on_disk):
            signature = await asyncio.to_thread(self.repository.signature, name)
            if self.seen.get(name) != signature:
                log.info("model folder %s is new or changed: loading it", name)
                self.seen[name] = signature
                retired = await asyncio.to_thread(self.repository.load_or_refuse, name)
                await self.repository.retire(retired)

    async def follow_once(self) -> None:
        """Applies a generation of the shared state this process has not applied yet."""
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
                retired = await asyncio.to_thread(self.repository.load_or_refuse, name)
                await self.repository.retire(retired)
        self.shared.applied[self.shared.index] = state["generation"]
