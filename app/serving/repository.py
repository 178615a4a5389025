"""The model repository: which models and versions are served, which are refused and why, and the
one lookup. Models are loaded, reloaded and unloaded here, at start or while serving
(app/serving/control.py decides when), one at a time.

Layout: ``models/NAME/`` holds ``model.json`` and ``model.onnx`` (a flat model: version 1), or
numbered folders ``models/NAME/1/``, ``models/NAME/2/``, each with its own ``model.json`` and
``model.onnx`` (Triton's layout); the newest version's ``version_policy`` says which are served
(the newest one by default).

A reload loads, checks and warms the new versions before any request can find them, then swaps
them in at once: a request looks its model up and is admitted in one step on the event loop, so
it runs on the old version or the new one, never a half-swapped one. The old versions are closed
once the requests they admitted have answered (``retire``). A version that fails to load is
refused with its reason (``/models``, the log) and whatever served before goes on serving.

Nothing outside the repository is read: a name is one path segment (no ``/``, no ``..``), and a
model folder, version folder or file that a symbolic link takes outside is not a model.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.metrics import Metrics
from app.serving import loader
from app.serving.activity import Activity
from app.serving.errors import BadRequest, NotFound, Unavailable
from app.serving.feed import FeedClient
from app.serving.loader import FLAT_VERSION, Model, ModelRefused, Refusal, fingerprint_of, read_spec
from app.serving.spec import NAME_PATTERN

log = logging.getLogger("cnnserve.repository")

RETIRE_POLL_SECONDS = 0.01
# A version folder's name, as Triton's: ASCII digits, no leading zero. (str.isdigit takes '\u00b2',
# which int() refuses, and '01' would be a second version 1.)
VERSION_FOLDER = r"[1-9][0-9]*"


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index (the Open Inference Protocol's repository extension)."""

    name: str
    version: str
    state: str  # READY, UNAVAILABLE (refused) or UNLOADED (on disk, not loaded)
    reason: str = ""  # for a READY row: why a new copy was refused while this one serves on


class Repository:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        processes: int,
        activity: Activity | None = None,
        feed: FeedClient | None = None,
    ) -> None:
        self.settings = settings
        self.feed = feed  # the shared feed's inference process runs the batches, if there is one
        self.metrics = metrics
        self.processes = processes
        self.activity = activity or Activity()  # shared by every model: a request anywhere is activity
        self.models: dict[str, Model] = {}  # name -> the version a request gets when it names none
        self.versions: dict[str, dict[str, Model]] = {}  # name -> version -> model, newest first
        self.refused: dict[str, Refusal] = {}  # a model that serves nothing, and why
        self.failed_versions: dict[str, dict[str, str]] = {}  # versions not served while others are
        self.loaded = False
        self.lock = threading.Lock()  # one load or unload at a time

    # -- loading ---------------------------------------------------------------------------

    def load_all(self) -> list[Model]:
        """Every model folder, one at a time (blocking: call it off the event loop), then mark
        the repository loaded. Returns the models replaced, for ``retire``."""
        retired = [old for name in self.names() for old in self.load_or_refuse(name)]
        self.loaded = True
        return retired

    def load_or_refuse(self, name: str) -> list[Model]:
        """``load``, with a folder that is no model (a link out of the repository) refused."""
        try:
            return self.load(name)
        except (BadRequest, NotFound) as error:
            with self.lock:
                self._refuse(name, self.settings.models_dir / name, {}, error.message)
            return []

    def load_initial(self) -> None:
        """What the control mode loads at start: every model, or in explicit mode the ones named."""
        if self.settings.model_control != "explicit":
            self.load_all()
            return
        for name in self.settings.load_model_list:
            try:
                self.load(name)
            except (BadRequest, NotFound) as error:
                log.error("cannot load model %s at start: %s", name, error.message)
        self.loaded = True

    def load(self, name: str) -> list[Model]:
        """Loads (or reloads) model ``name`` as its folder now is; versions whose files have not
        changed are kept as they are. Returns the models no longer served, for ``retire``.
        Raises BadRequest or NotFound for a name that is no model folder; a model that cannot be
        served is refused (``refused``, ``failed_versions``), not raised."""
        folder = self.folder(name)
        with self.lock:
            try:
                wanted = self.discover(name, folder)
            except ModelRefused as refused:
                self._refuse(name, folder, {}, str(refused))
                return []
            current = self.versions.get(name, {})
            fresh, failures = self._load_versions(name, wanted, current)
            if not fresh:
                self._refuse(name, folder, failures, summary(failures))
                return []
            self._install(name, fresh, failures)
            return [old for version, old in current.items() if fresh.get(version) is not old]

    def unload(self, name: str) -> list[Model]:
        """Stops serving model ``name``; returns its models, for ``retire``. NotFound if it is
        neither served nor refused."""
        with self.lock:
            removed = self.versions.pop(name, {})
            if not removed and self.refused.pop(name, None) is None:
                raise NotFound(f"model {name!r} is not loaded")
            self.models.pop(name, None)
            self.refused.pop(name, None)
            self.failed_versions.pop(name, None)
            for model in removed.values():
                self.metrics.model_loaded.labels(name, model.version, model.providers[0]).set(0)
            self.metrics.model_failed.labels(name).set(0)
            self.metrics.model_unloads.labels(name).inc()
        log.info("unloaded model %s (%s)", name, ", ".join(f"version {v}" for v in removed) or "it was refused")
        return list(removed.values())

    async def retire(self, models: list[Model]) -> None:
        """Closes models that no request can find any more, each once the requests it admitted
        have answered (at most a request's time limit later), then gives the freed memory back to
        the system: glibc keeps freed arenas otherwise, and resident memory grows with every reload.
        Also when nothing is retired, since this follows every load: a load reads, parses and
        optimises the model, and what that freed stayed resident until the next trim (measured:
        about 70 MB after each load of EfficientNet-Lite0)."""
        loop = asyncio.get_running_loop()
        for model in models:
            deadline = loop.time() + model.timeout + self.settings.body_timeout_s
            while model.batcher.admitted > 0 and loop.time() < deadline:
                await asyncio.sleep(RETIRE_POLL_SECONDS)
            await model.batcher.close()
        del models[:]
        await asyncio.to_thread(release_memory)

    def _load_versions(
        self, name: str, wanted: dict[str, Path], current: dict[str, Model]
    ) -> tuple[dict[str, Model], dict[str, str]]:
        """The models for the wanted versions, newest first: kept if unchanged, loaded if new or
        changed; a version that fails keeps its old model if it had one."""
        fresh: dict[str, Model] = {}
        failures: dict[str, str] = {}
        for version, folder in wanted.items():
            old = current.get(version)
            if old is not None and old.fingerprint == fingerprint_of(folder):
                fresh[version] = old
                self.metrics.model_loads.labels(name, "unchanged").inc()
                continue
            started = time.perf_counter()
            try:
                model = loader.load(
                    folder,
                    self.settings,
                    self.metrics,
                    self.processes,
                    self.activity,
                    name=name,
                    version=version,
                    feed=self.feed,
                )
            except ModelRefused as refused:
                failures[version] = str(refused)
                self.metrics.model_loads.labels(name, "refused").inc()
                log.error("refused model %s version %s: %s", name, version, refused)
                if old is not None:
                    fresh[version] = old
                continue
            self.metrics.model_load_duration.labels(name).observe(time.perf_counter() - started)
            self.metrics.model_loads.labels(name, "loaded").inc()
            fresh[version] = model
            log.info(
                "loaded model %s on %s (version %s) in %.2f s (sha256 verified); %s",
                name,
                model.providers[0],
                version,
                model.load_seconds,
                model.plan.describe(),
            )
        return fresh, failures

    def _install(self, name: str, fresh: dict[str, Model], failures: dict[str, str]) -> None:
        """Makes ``fresh`` what requests for ``name`` find, all at once."""
        old = self.versions.get(name, {})
        self.versions[name] = fresh
        self.models[name] = next(iter(fresh.values()))
        self.refused.pop(name, None)
        self.failed_versions[name] = failures
        for version, model in old.items():
            if fresh.get(version) is not model:
                self.metrics.model_loaded.labels(name, version, model.providers[0]).set(0)
        for version, model in fresh.items():
            self.metrics.model_loaded.labels(name, version, model.providers[0]).set(1)
        self.metrics.model_failed.labels(name).set(0)

    def _refuse(self, name: str, folder: Path, failures: dict[str, str], reason: str) -> None:
        """Nothing new of ``name`` can be served: what served before stays, else it is refused."""
        if name in self.versions:
            self.failed_versions[name] = failures or {"": reason}
            log.error("model %s: nothing new could be loaded, the versions served before stay: %s", name, reason)
            return
        self.refused[name] = Refusal(name, folder, reason)
        self.failed_versions[name] = failures
        self.metrics.model_failed.labels(name).set(1)
        if not failures:  # refused before any version was tried
            self.metrics.model_loads.labels(name, "refused").inc()
            log.error("refused model %s: %s", name, reason)

    # -- the folders -------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The model folders in the repository (hidden ones left out)."""
        root = self.settings.models_dir
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def folder(self, name: str) -> Path:
        """The folder of model ``name``: BadRequest for a name that is not one path segment of the
        allowed characters, NotFound for a folder that is missing or that a link takes outside."""
        if not re.fullmatch(NAME_PATTERN, name):
            raise BadRequest(f"{name!r} is not a model name (letters, digits, '_', '.', '-'; no '/')")
        root = self.settings.models_dir.resolve()
        folder = self.settings.models_dir / name
        if not folder.is_dir() or not inside(folder, root):
            raise NotFound(f"no model folder {name!r} in the repository")
        return folder

    def signature(self, name: str) -> tuple[object, ...]:
        """What model ``name``'s files look like on disk now (every version folder's files, sizes
        and modification times): poll mode reloads a model when this changes."""
        folder = self.settings.models_dir / name
        try:
            subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
            return tuple((sub.name, fingerprint_of(sub)) for sub in [folder, *subfolders])
        except OSError:  # the folder went while it was read: the next look sees it gone
            return ()

    def discover(self, name: str, folder: Path) -> dict[str, Path]:
        """The version folders to serve, newest first, as the version policy chooses; raises
        ModelRefused when there is no model to be found."""
        root = self.settings.models_dir.resolve()
        if (folder / "model.json").is_file():
            return {FLAT_VERSION: folder}
        numbered = {
            int(p.name): p
            for p in folder.iterdir()
            if re.fullmatch(VERSION_FOLDER, p.name) and p.is_dir() and inside(p, root)
        }
        if not numbered:
            raise ModelRefused("no model.json, and no numbered version folders")
        policy = None
        for version in sorted(numbered, reverse=True):
            try:
                policy = read_spec(numbered[version], name).version_policy
                break
            except ModelRefused:
                continue
        if policy is None:
            raise ModelRefused("no version folder has a valid model.json")
        chosen = policy.choose(list(numbered))
        if not chosen:
            raise ModelRefused(f"the version policy serves none of the versions {sorted(numbered)}")
        return {str(v): numbered[v] for v in chosen}

    # -- lookups -------------------------------------------------------------------------------

    def entry(self, name: str) -> Model | Refusal:
        """The served or refused model called ``name``; NotFound (or 503 while loading) otherwise."""
        found = self.models.get(name) or self.refused.get(name)
        if found is not None:
            return found
        if not self.loaded:
            raise Unavailable("models are still loading", headers={"Retry-After": "1"})
        raise NotFound(f"unknown model {name!r}; served models: {sorted(self.models)}")

    def get(self, name: str | None, version: str | None = None) -> Model:
        """The served model called ``name`` (the default model when None) at ``version`` (the newest
        served when None), or the error that says why not: 404 unknown, 503 refused at load or
        still loading."""
        name = name or self.settings.default_model
        found = self.entry(name)
        if isinstance(found, Refusal):
            raise Unavailable(f"model {name!r} failed to load: {found.reason}")
        if version is None:
            return found
        model = self.versions.get(name, {}).get(version)
        if model is None:
            served = ", ".join(self.versions.get(name, {}))
            raise NotFound(f"model {name!r} has no version {version!r} served; served versions: {served}")
        return model

    def entries(self) -> list[Model | Refusal]:
        """Served and refused models, by name."""
        every: dict[str, Model | Refusal] = {**self.refused, **self.models}
        return [every[name] for name in sorted(every)]

    def index(self) -> list[IndexEntry]:
        """Every model in the repository folder and every version of it known here: served,
        refused, or on disk and not loaded."""
        rows = []
        for name in sorted(set(self.names()) | set(self.versions) | set(self.refused)):
            served, failed = self.versions.get(name, {}), self.failed_versions.get(name, {})
            rows += [IndexEntry(name, version, "READY", failed.get(version, "")) for version in served]
            rows += [
                IndexEntry(name, version, "UNAVAILABLE", why)
                for version, why in failed.items()
                if version not in served
            ]
            if name in self.refused and not self.failed_versions.get(name):
                rows.append(IndexEntry(name, "", "UNAVAILABLE", self.refused[name].reason))
            if not served and name not in self.refused:
                rows.append(IndexEntry(name, "", "UNLOADED"))
        return rows

    async def close(self) -> None:
        for versions in self.versions.values():
            for model in versions.values():
                await model.batcher.close()


def summary(failures: dict[str, str]) -> str:
    """Why no version loaded: the one reason, or each version's."""
    if len(failures) == 1:
        return next(iter(failures.values()))
    return "; ".join(f"version {version}: {why}" for version, why in failures.items())


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, links followed, lies in ``root`` (and is not ``root`` itself)."""
    resolved = path.resolve()
    return resolved != root and resolved.is_relative_to(root)


def release_memory() -> None:
    """Collect what the retired models left and hand freed heap back to the system (glibc's
    malloc_trim; a no-op elsewhere). Objects loaded at start were frozen out of the collector's
    sight (app/http/app.py, settle_garbage_collector): unfrozen for this one collection, or a
    retired model caught in a reference cycle would never be freed."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
