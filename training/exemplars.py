"""What excites a channel: for every convolution channel of a Fashion-MNIST network, the nine test
images whose largest activation in that channel is the largest, with where the maximum lies and the
patch of the input that position sees (its receptive field).

It runs the exported model.onnx with ONNX Runtime (every convolution's output promoted to a graph
output, as the service's feature-map session does), so the numbers are the served model's, and
writes beside it:

- ``exemplars.json``: per layer (the convolutions app/serving/inspect/graph.py finds, by the same
  names), per channel, nine rows ``[test index, activation, y, x, top, left, bottom, right]``:
  the activation is the convolution's output (batch norm folded, before the ReLU) at its maximum
  (y, x), and the box (bottom and right exclusive) is that position's receptive field, clipped to
  the 28x28 image;
- ``exemplars.png``: each test image the rows name, once, in a grey atlas of 28x28 cells, in the
  order of the file's ``images`` list. The service crops the patches from it, so that it needs no
  dataset; storing whole images once, rather than a patch per row, keeps the four networks' files
  small, because deeper layers' receptive fields cover most of the image anyway.

    python -m training.exemplars --arch lenet5        # or alexnet, googlenet, resnet, all
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image
from tqdm import tqdm

from app.serving.inspect.featuremaps import promote
from app.serving.inspect.graph import Layer, find_layers
from training.data import load_split

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
FASHION = ("lenet5", "alexnet", "googlenet", "resnet")
TOP = 9
CELL = 28
COLUMNS = 64
ENTRY = ["image", "activation", "y", "x", "top", "left", "bottom", "right"]
WINDOWED = {"Conv", "MaxPool", "AveragePool", "LpPool"}


@dataclass(frozen=True)
class Field:
    """Where a tensor's positions look in the input, per axis (the networks here are square):
    position i sees input pixels ``offset + i * jump`` to ``offset + i * jump + size - 1``."""

    offset: int
    jump: int
    size: int

    def box(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of position (y, x)'s field, bottom and right exclusive, clipped."""
        top, left = self.offset + y * self.jump, self.offset + x * self.jump
        return max(top, 0), max(left, 0), min(top + self.size, height), min(left + self.size, width)

    def through(self, node: onnx.NodeProto) -> Field:
        """The field after a convolution or pooling window: the classic recurrence
        size += (k - 1) * dilation * jump, offset -= pad * jump, jump *= stride."""
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kernel = int(attrs["kernel_shape"][0]) if "kernel_shape" in attrs else None
        if kernel is None:
            raise ValueError(f"{node.name or node.op_type}: no kernel_shape attribute; cannot trace its field")
        stride = int(attrs.get("strides", [1])[0])
        pad = int(attrs.get("pads", [0])[0])
        dilation = int(attrs.get("dilations", [1])[0])
        return Field(self.offset - pad * self.jump, self.jump * stride, self.size + (kernel - 1) * dilation * self.jump)


def union(fields: list[Field]) -> Field:
    """Where branches meet (a residual addition, an Inception concatenation) a position sees what
    any branch sees: the smallest box covering all of them (their jumps agree in these networks)."""
    first = min(f.offset for f in fields)
    last = max(f.offset + f.size for f in fields)
    return Field(first, max(f.jump for f in fields), last - first)


def receptive_fields(model: onnx.ModelProto) -> dict[str, Field]:
    """Every tensor computed from the input, with its field, walking the graph in its (topological) order."""
    fields = {i.name: Field(0, 1, 1) for i in model.graph.input}
    for node in model.graph.node:
        known = [fields[name] for name in node.input if name in fields]
        if not known:
            continue
        merged = union(known)
        if node.op_type in WINDOWED:
            merged = merged.through(node)
        for name in node.output:
            fields[name] = merged
    return fields


@dataclass
class Best:
    """One layer's running top ``TOP`` per channel: values, test indices and flat positions, sorted
    best first (ties: the lower test index first)."""

    layer: Layer
    channels: int
    width: int
    values: np.ndarray = field(init=False)
    images: np.ndarray = field(init=False)
    positions: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.values = np.full((self.channels, 0), -np.inf, np.float32)
        self.images = np.zeros((self.channels, 0), np.int64)
        self.positions = np.zeros((self.channels, 0), np.int64)

    def add(self, maps: np.ndarray, first_index: int) -> None:
        """Merge a batch of maps (B, C, H, W) whose first image is test image ``first_index``."""
        flat = maps.reshape(maps.shape[0], maps.shape[1], -1)
        where = flat.argmax(-1)
        peak = np.take_along_axis(flat, where[..., None], -1)[..., 0]
        values = np.concatenate([self.values, peak.T], axis=1)
        images = np.concatenate([self.images, np.broadcast_to(first_index + np.arange(len(maps)), peak.T.shape)], 1)
        positions = np.concatenate([self.positions, where.T], axis=1)
        order = np.argsort(-values, axis=1, kind="stable")[:, :TOP]
        self.values = np.take_along_axis(values, order, 1)
        self.images = np.take_along_axis(images, order, 1)
        self.positions = np.take_along_axis(positions, order, 1)


def normalise(images: np.ndarray, spec: dict[str, object]) -> np.ndarray:
    """uint8 (N, 28, 28) -> the (N, 1, 28, 28) float input model.json describes."""
    mean, std = spec["mean"], spec["std"]
    assert isinstance(mean, list) and isinstance(std, list)
    return ((images.astype(np.float32) - mean[0]) / std[0])[:, None]


def search(folder: Path, images: np.ndarray, batch: int = 250, progress: bool = True) -> dict[str, object]:
    """The exemplars of every convolution channel of the model in ``folder`` over ``images``: the
    content of exemplars.json (its ``images`` list names the rows' test images, in atlas order)."""
    proto = onnx.load(str(folder / "model.onnx"))
    spec = json.loads((folder / "model.json").read_text())
    convolutions = [layer for layer in find_layers(proto) if layer.stage == "convolution"]
    fields = receptive_fields(proto)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    tensors = [layer.tensor for layer in convolutions]
    session = ort.InferenceSession(promote(proto, tensors).SerializeToString(), options, ["CPUExecutionProvider"])
    x = normalise(images, spec["input"])
    best: list[Best] = []
    starts = range(0, len(x), batch)
    for start in tqdm(starts, desc=folder.name, unit="batch", leave=False, disable=not progress):
        outputs = session.run(tensors, {spec["input"]["name"]: x[start : start + batch]})
        if not best:
            best = [Best(layer, out.shape[1], out.shape[3]) for layer, out in zip(convolutions, outputs, strict=True)]
        for kept, out in zip(best, outputs, strict=True):
            kept.add(out, start)
    return _document(best, fields, images.shape, folder.name)


def _document(best: list[Best], fields: dict[str, Field], shape: tuple[int, ...], name: str) -> dict[str, object]:
    height, width = shape[1], shape[2]
    used = sorted({int(i) for kept in best for i in kept.images.ravel()})
    layers: dict[str, object] = {}
    for kept in best:
        f = fields[kept.layer.tensor]
        rows = []
        for c in range(kept.channels):
            channel = []
            for value, image, position in zip(kept.values[c], kept.images[c], kept.positions[c], strict=True):
                y, x = divmod(int(position), kept.width)
                channel.append([int(image), round(float(value), 4), y, x, *f.box(y, x, height, width)])
            rows.append(channel)
        layers[kept.layer.name] = {"receptive_field": f.size, "jump": f.jump, "offset": f.offset, "channels": rows}
    return {
        "model": name,
        "dataset": "Fashion-MNIST",
        "split": "test",
        "samples": int(shape[0]),
        "top": TOP,
        "cell": CELL,
        "columns": COLUMNS,
        "entry": ENTRY,
        "images": used,
        "layers": layers,
    }


def atlas(images: np.ndarray, used: list[int]) -> np.ndarray:
    """The named images in a grid of COLUMNS cells per row, in the order given (unused cells black)."""
    rows = -(-len(used) // COLUMNS)
    grid = np.zeros((rows * CELL, COLUMNS * CELL), np.uint8)
    for slot, index in enumerate(used):
        r, c = divmod(slot, COLUMNS)
        grid[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = images[index]
    return grid


def export(name: str, images: np.ndarray, models: Path = MODELS) -> tuple[int, int]:
    """Write exemplars.json and exemplars.png into models/NAME; their sizes in bytes."""
    folder = models / name
    document = search(folder, images)
    used = document["images"]
    assert isinstance(used, list)
    Image.fromarray(atlas(images, used)).save(folder / "exemplars.png", optimize=True)
    (folder / "exemplars.json").write_text(json.dumps(document, separators=(",", ":")) + "\n")
    return (folder / "exemplars.json").stat().st_size, (folder / "exemplars.png").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=[*FASHION, "all"], default="all")
    parser.add_argument("--images", type=int, default=None, help="only the first N test images")
    args = parser.parse_args()
    images = load_split("test").images[: args.images]
    for name in FASHION if args.arch == "all" else (args.arch,):
        sizes = export(name, images)
        print(f"{name}: exemplars.json {sizes[0] / 1024:.0f} KiB, exemplars.png {sizes[1] / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
