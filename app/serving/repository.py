"""The model repository: the served models and the refused ones, and the one lookup.

Every folder under the models directory is loaded or refused with a reason that /models shows; one
broken folder never stops the others from being served.
"""

from __future__ import annotations

import logging
from pathlib import Path

from app.config import Settings
from app.metrics import Metrics
from app.serving import loader
from app.serving.activity import Activity
from app.serving.errors import NotFound, Unavailable
from app.serving.loader import Model, ModelRefused, Refusal

log = logging.getLogger("cnnserve.repository")


class Repository:
    def __init__(self, settings: Settings, metrics: Metrics, processes: int, activity: Activity | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.processes = processes
        self.activity = activity or Activity()  # shared by every model: a request anywhere is activity
        self.models: dict[str, Model] = {}
        self.refused: dict[str, Refusal] = {}
        self.loaded = False

    def load_all(self) -> None:
        """Every folder, one at a time (blocking: call it off the event loop), then mark loaded."""
        for folder in self.folders():
            try:
                model = loader.load(folder, self.settings, self.metrics, self.processes, self.activity)
            except ModelRefused as refused:
                self.refused[folder.name] = Refusal(folder.name, folder, str(refused))
                self.metrics.model_failed.labels(folder.name).set(1)
                log.error("refused model %s: %s", folder.name, refused)
                continue
            self.models[model.name] = model
            self.metrics.model_loaded.labels(model.name, model.providers[0]).set(1)
            log.info(
                "loaded model %s on %s in %.2f s (sha256 verified); %s",
                model.name,
                model.providers[0],
                model.load_seconds,
                model.plan.describe(),
            )
        self.loaded = True

    def folders(self) -> list[Path]:
        root = self.settings.models_dir
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def entry(self, name: str) -> Model | Refusal:
        """The served or refused model called ``name``; NotFound (or 503 while loading) otherwise."""
        found = self.models.get(name) or self.refused.get(name)
        if found is not None:
            return found
        if not self.loaded:
            raise Unavailable("models are still loading", headers={"Retry-After": "1"})
        raise NotFound(f"unknown model {name!r}; served models: {sorted(self.models)}")

    def get(self, name: str | None, version: str | None = None) -> Model:
        """The served model called ``name`` (the default model when None) at ``version`` (any when
        None), or the error that says why not: 404 unknown, 503 refused at load or still loading."""
        name = name or self.settings.default_model
        found = self.entry(name)
        if isinstance(found, Refusal):
            raise Unavailable(f"model {name!r} failed to load: {found.reason}")
        if version is not None and version != found.version:
            raise NotFound(f"model {name!r} has only version {found.version}, not {version!r}")
        return found

    def entries(self) -> list[Model | Refusal]:
        """Served and refused models, by name."""
        every: dict[str, Model | Refusal] = {**self.refused, **self.models}
        return [every[name] for name in sorted(every)]

    async def close(self) -> None:
        for model in self.models.values():
            await model.batcher.close()
