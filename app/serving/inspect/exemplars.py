"""What excites a channel: the test images that activate a convolution channel most, read from the
``exemplars.json`` and ``exemplars.png`` that ``python -m training.exemplars`` leaves beside a
model.onnx. A model folder without them simply has none (404); the service never needs the dataset.

The files are read the first time a model's exemplars are asked for and kept while they stay the
same (keyed by their size and modification time, so a model reloaded with new files is re-read).
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.serving.errors import NotFound
from app.serving.inspect import render
from app.serving.schemas import Exemplar, ExemplarResponse

FILE = "exemplars.json"
ATLAS = "exemplars.png"
GRID = 3  # the picture: 3 x 3 patches
PICTURE_CELL = 84  # pixels per patch in the picture (nearest-neighbour upscaling)


@dataclass(frozen=True)
class Exemplars:
    """One model's file: rows per layer and channel, and the atlas of the test images they name."""

    layers: dict[str, dict[str, Any]]
    entry: list[str]
    slots: dict[int, int]  # test index -> cell in the atlas
    atlas: np.ndarray
    cell: int
    columns: int

    def image(self, index: int) -> np.ndarray:
        row, column = divmod(self.slots[index], self.columns)
        return self.atlas[row * self.cell : (row + 1) * self.cell, column * self.cell : (column + 1) * self.cell]

    def rows(self, model: str, layer: str, channel: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The layer's record and the channel's rows as dicts, or NotFound naming what exists."""
        found = self.layers.get(layer)
        if found is None:
            raise NotFound(f"model {model!r} has no exemplars for layer {layer!r}; they exist for {list(self.layers)}")
        channels = found["channels"]
        if channel >= len(channels):
            raise NotFound(f"layer {layer!r} has channels 0-{len(channels) - 1}, not {channel}")
        return found, [dict(zip(self.entry, row, strict=True)) for row in channels[channel]]


_CACHE: dict[Path, tuple[tuple[int, int, int, int], Exemplars]] = {}
_LOCK = threading.Lock()


def load(folder: Path) -> Exemplars | None:
    """The folder's exemplars (None when it has no file), read once while the files stay the same."""
    json_path, png_path = folder / FILE, folder / ATLAS
    if not all(p.resolve().is_relative_to(folder.resolve()) for p in (json_path, png_path)):
        return None  # a symbolic link out of the model folder: nothing outside the repository is read
    try:
        stats = json_path.stat(), png_path.stat()
    except FileNotFoundError:
        return None
    key = (stats[0].st_size, stats[0].st_mtime_ns, stats[1].st_size, stats[1].st_mtime_ns)
    with _LOCK:
        cached = _CACHE.get(folder)
        if cached is not None and cached[0] == key:
            return cached[1]
        document = json.loads(json_path.read_text())
        with Image.open(png_path) as picture:
            atlas = np.asarray(picture.convert("L"))
        found = Exemplars(
            layers=document["layers"],
            entry=document["entry"],
            slots={int(index): slot for slot, index in enumerate(document["images"])},
            atlas=atlas,
            cell=int(document["cell"]),
            columns=int(document["columns"]),
        )
        _CACHE[folder] = (key, found)
        return found


def answer(exemplars: Exemplars, model: str, layer: str, channel: int) -> ExemplarResponse:
    """The channel's exemplars with their patches and images as PNG data URLs."""
    record, rows = exemplars.rows(model, layer, channel)
    entries = []
    for row in rows:
        image = exemplars.image(row["image"])
        top, left, bottom, right = row["top"], row["left"], row["bottom"], row["right"]
        entries.append(
            Exemplar(
                index=row["image"],
                activation=row["activation"],
                position=[row["y"], row["x"]],
                box=[top, left, bottom, right],
                patch=_data_url(image[top:bottom, left:right]),
                image=_data_url(image),
            )
        )
    return ExemplarResponse(
        model=model,
        layer=layer,
        channel=channel,
        channels=len(record["channels"]),
        receptive_field=record["receptive_field"],
        exemplars=entries,
    )


def picture(exemplars: Exemplars, model: str, layer: str, channel: int) -> bytes:
    """The patches in a 3 x 3 grid, best first in reading order, each scaled to fill its cell
    (a patch clipped at the image's border keeps its aspect ratio), on grey separators."""
    _, rows = exemplars.rows(model, layer, channel)
    side = GRID * PICTURE_CELL + GRID + 1
    canvas = np.full((side, side), render.SEPARATOR[0], np.uint8)
    for slot, row in enumerate(rows[: GRID * GRID]):
        patch = exemplars.image(row["image"])[row["top"] : row["bottom"], row["left"] : row["right"]]
        scale = PICTURE_CELL / max(patch.shape)
        size = (max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[0] * scale)))
        scaled = np.asarray(Image.fromarray(patch).resize(size, Image.Resampling.NEAREST))
        r, c = divmod(slot, GRID)
        y, x = 1 + r * (PICTURE_CELL + 1), 1 + c * (PICTURE_CELL + 1)
        canvas[y : y + scaled.shape[0], x : x + scaled.shape[1]] = scaled
    return render.png(canvas)


def _data_url(pixels: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(render.png(np.ascontiguousarray(pixels))).decode()
