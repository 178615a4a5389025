"""``cnnserve import``: an ONNX classifier -> a complete model folder of the repository.

What the graph knows (input and output names, layout, size, class count) is read from the graph;
what it cannot know (colour order, resize and crop, mean and std, labels) comes from a preset,
flags, or the framework the model was exported from (training/importer.py, which hands an ONNX
file here). Every mistake we can see before serving is refused with what to do about it; the
rest is left to the loader the service uses (app/serving/loader.py), which app/serving/check.py
runs on the written folder. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from pydantic import ValidationError

from app.serving import loader
from app.serving.errors import ServingError
from app.serving.presets import BUILTIN_LABELS, PIXEL_SCALE, PRESETS, resize_for
from app.serving.spec import NAME_PATTERN, InputSpec, ModelSpec, OutputSpec, Source

IMAGENET_MODEL = Path(__file__).resolve().parents[2] / "models" / "efficientnet_lite0"
STAGING = ".importing-"  # a folder being written; hidden, so neither the repository nor poll mode sees it
NO_RESIZE = "none"  # --resize none: straight to the input size, no centre crop
VERSION_FOLDER = r"[1-9][0-9]*"  # as app/serving/repository.py reads them


class ImportRefused(ServingError):
    """A model that would be served wrongly or not at all, with what to change."""

    status = 422


@dataclass(frozen=True)
class GraphFacts:
    """What the ONNX graph says about its one image input and its class scores (None: dynamic)."""

    input: str
    input_shape: tuple[int | None, ...]
    output: str
    output_shape: tuple[int | None, ...] | None  # None: the graph does not say

    @property
    def layout(self) -> str:
        shape = self.input_shape
        if len(shape) != 4:
            raise ImportRefused(f"input {self.input!r} has shape {list(shape)}: an image batch has 4 dimensions")
        if shape[1] in (1, 3):
            return "NCHW"
        if shape[3] in (1, 3):
            return "NHWC"
        raise ImportRefused(
            f"input {self.input!r} has shape {shape_text(shape)}: no dimension of 1 or 3 channels; give --layout"
        )

    def spatial(self, layout: str) -> tuple[int | None, int | None]:
        return (self.input_shape[2], self.input_shape[3]) if layout == "NCHW" else self.input_shape[1:3]  # type: ignore[return-value]

    def channels(self, layout: str) -> int | None:
        return self.input_shape[1] if layout == "NCHW" else self.input_shape[3]

    @property
    def classes(self) -> int | None:
        return self.output_shape[1] if self.output_shape and len(self.output_shape) == 2 else None


def shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    if not value.type.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in value.type.tensor_type.shape.dim
    )


def read_graph(path: Path, output: str | None = None) -> GraphFacts:
    """The one image input and the class-score output of the ONNX file at ``path`` (``output``
    chooses among several). External data is only checked, not read: it must lie beside the file."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ImportRefused(f"{path}: no such file") from None
    except Exception as error:  # protobuf's DecodeError and friends
        raise ImportRefused(f"{path} is not an ONNX model: {error}") from None
    try:
        loader.check_external_data(proto, path.parent)
    except loader.ModelRefused as refused:
        raise ImportRefused(
            f"{refused}: copy it beside {path.name}, or re-save the model with its weights inside"
        ) from None
    if not any(v.HasField("shape") for v in (o.type.tensor_type for o in proto.graph.output)):
        proto = onnx.shape_inference.infer_shapes(proto)
    weights = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise ImportRefused(
            f"the graph has {len(inputs)} inputs {[i.name for i in inputs]}; an image classifier has one"
        )
    outputs = {o.name: _dims(o) for o in proto.graph.output}
    if output is not None and output not in outputs:
        raise ImportRefused(f"no output {output!r}; the graph's outputs are {list(outputs)}")
    chosen = output or next((n for n, s in outputs.items() if s is not None and len(s) == 2), next(iter(outputs)))
    shape = outputs[chosen]
    if shape is not None and len(shape) != 2:
        hint = "; flatten it in the model" if len(shape) == 4 and shape[2:] == (1, 1) else ""
        raise ImportRefused(
            f"output {chosen!r} has shape {shape_text(shape)}: not a class vector (batch, classes){hint}; "
            f"the graph's outputs are {list(outputs)} (choose one with --output)"
        )
    return GraphFacts(inputs[0].name, _dims(inputs[0]) or (), chosen, shape)


UNRUNNABLE = (
    re.compile(r"(?P<op>[\w.]+:[\w.]+)\((?P<version>-?\d+)\) is not a registered function/op"),
    re.compile(
        r"Could not find an implementation for (?P<op>\w+)\((?P<version>\d+)\) node with name '(?P<node>[^']*)'"
    ),
    re.compile(
        r"\(\"(?P<node>[^\"]*)\", (?P<op>\w+), .*No Op registered for \w+ with domain_version of (?P<version>\d+)"
    ),
)


def check_runtime(path: Path) -> None:
    """Open the file in ONNX Runtime once, so that an operator it cannot run (a custom one, or one
    newer or older than its kernels) is named now rather than as a refusal at load."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises several unrelated types
        text = str(error)
        for pattern in UNRUNNABLE:
            found = pattern.search(text)
            if found:
                where = f" (node {found['node']!r})" if "node" in found.groupdict() and found["node"] else ""
                raise ImportRefused(
                    f"ONNX Runtime {ort.__version__} cannot run operator {found['op']} at opset {found['version']}"
                    f"{where}: export with operators it implements (a standard opset, no custom domain)"
                ) from None
        raise ImportRefused(f"ONNX Runtime {ort.__version__} cannot load {path.name}: {text}") from None


def input_spec(facts: GraphFacts, preset: str | None = None, **given: Any) -> InputSpec:
    """The InputSpec of the graph's input: the preset's fields, then what was given (None: not
    given; ``resize="none"``: no crop), with the graph's own layout and size where it has them.
    A preset's crop keeps its share of the shorter side at the size used (imagenet's 224 of 256
    is 36 at 32)."""
    if preset is not None and preset not in PRESETS:
        raise ImportRefused(f"no preset {preset!r}; the presets are {', '.join(PRESETS)}")
    base: dict[str, Any] = dict(PRESETS[preset]) if preset else {}
    fields = {**base, **{key: value for key, value in given.items() if value is not None}}
    if fields.get("resize") == NO_RESIZE:
        fields["resize"] = None
    layout = fields.pop("layout", None) or facts.layout
    height, width = facts.spatial(layout)
    if height is None or width is None:
        if "height" not in fields:
            raise ImportRefused(
                f"input {facts.input!r} has dynamic spatial dimensions {shape_text(facts.input_shape)}; "
                "give the size it was trained at (--size 224) or a --preset"
            )
    elif given.get("height") is not None and (given["height"], given["width"]) != (height, width):
        raise ImportRefused(
            f"--size {given['height']}x{given['width']} does not fit the graph's input {height}x{width}"
        )
    else:
        fields["height"], fields["width"] = height, width
    if given.get("resize") is None and base.get("resize") and base["height"] != fields["height"]:
        fields["resize"] = resize_for(min(fields["height"], fields["width"]), base["height"] / base["resize"])
    channels = facts.channels(layout)
    if "color" not in fields:
        fields["color"] = "L" if channels == 1 else "RGB"
    if channels is not None and channels != (1 if fields["color"] == "L" else 3):
        raise ImportRefused(f"colour {fields['color']} does not fit the graph's {channels} input channel(s)")
    for key in ("mean", "std"):
        if key not in fields:
            raise ImportRefused(
                f"no {key}: give --preset ({', '.join(PRESETS)}) or --mean and --std on the 0..255 scale"
            )
    check_pixel_scale(fields["mean"], fields["std"])
    try:
        return InputSpec(name=facts.input, layout=layout, **fields)
    except ValidationError as error:
        raise ImportRefused(f"preprocessing: {error.errors()[0]['msg']}") from None


def check_pixel_scale(mean: list[float], std: list[float]) -> None:
    """model.json's mean and std are on the 0..255 scale; a std at or below 1 with a mean below 1
    is almost surely torchvision's 0..1 numbers, which would feed the network pixels 255 times
    too far from their mean (confident, wrong answers)."""
    if all(s <= 1 for s in std) and all(abs(m) <= 1 for m in mean) and any(s < 1 for s in std):
        scaled = ", ".join(f"{s * PIXEL_SCALE:g}" for s in std)
        raise ImportRefused(
            f"std {std} looks like the 0..1 scale, but model.json takes 0..255 pixels: "
            f"did you mean --std {scaled} (and the mean times 255)?"
        )


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet class names, from the EfficientNet-Lite0 model this repository serves
    (one list, kept where a served model needs it anyway)."""
    try:
        return loader.read_spec(IMAGENET_MODEL).labels
    except loader.ModelRefused as missing:
        raise ImportRefused(
            f"the built-in ImageNet labels are read from {IMAGENET_MODEL / 'model.json'} ({missing}); "
            "give --labels FILE instead"
        ) from None


def read_labels(source: str | Path | None, classes: int | None) -> list[str]:
    """Labels from ``imagenet`` (built in), a JSON list or {index: name} object, or a text file of
    one name a line; without any, the class indices as names. Their count must be the graph's."""
    if source is None:
        if classes is None:
            raise ImportRefused("the graph does not say how many classes it has; give --labels")
        labels = [str(i) for i in range(classes)]
    elif str(source) == BUILTIN_LABELS:
        labels = imagenet_labels()
    else:
        labels = _labels_file(Path(source))
    return counted(labels, classes)


def counted(labels: list[str], classes: int | None) -> list[str]:
    """``labels``, if there is one per class of the output (None: the graph does not say)."""
    if classes is not None and len(labels) != classes:
        raise ImportRefused(f"{len(labels)} labels for {classes} classes: the output has one score per class")
    return labels


def _labels_file(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ImportRefused(f"labels: {error}") from None
    if path.suffix == ".json":
        found = json.loads(text)
        if isinstance(found, dict):  # id2label style, keys as strings
            return [str(found[key]) for key in sorted(found, key=int)]
        return [str(label) for label in found]
    return [line.strip() for line in text.splitlines() if line.strip()]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Staged:
    """A model folder written under a hidden name in the repository (which neither the service nor
    poll mode looks at), checked there, then put in place in one rename, or thrown away."""

    folder: Path
    home: Path
    version: str

    @property
    def name(self) -> str:
        return self.home.name

    def commit(self) -> Path:
        """The folder in place: the model itself when new, else its version folder (a flat model's
        files are first moved into version folder 1, as a model with versions keeps them)."""
        try:
            if self.version == loader.FLAT_VERSION and not self.home.exists():
                self.folder.rename(self.home)
                return self.home
            if (self.home / "model.json").is_file():
                _flat_to_version_one(self.home)
            final = self.home / self.version
            self.folder.rename(final)
            return final
        except OSError as error:  # another import took the name or the version meanwhile
            self.discard()
            raise ImportRefused(f"{self.name} version {self.version} could not be put in place: {error}") from None

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def stage_model(
    repo: Path,
    name: str,
    onnx_file: Path,
    spec: InputSpec,
    facts: GraphFacts,
    labels: list[str],
    source: Source,
    *,
    kind: str = "logits",
    description: str = "",
) -> Staged:
    """model.onnx (with its external data) and model.json for ``repo/name``'s next version."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ImportRefused(f"{name!r} is not a model name (lower-case letters, digits, '_', '.', '-')")
    try:
        model = ModelSpec(
            name=name,
            description=description,
            input=spec,
            output=OutputSpec(name=facts.output, kind=kind),
            labels=labels,
            source=source,
            sha256=sha256_of(onnx_file),
        )
    except ValidationError as error:
        raise ImportRefused(f"model.json: {error.errors()[0]['msg']}") from None
    repo.mkdir(parents=True, exist_ok=True)
    home = repo / name
    version = next_version(home)
    staging = repo / f"{STAGING}{name}-{version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _copy_onnx(onnx_file, staging)
        written = model.model_dump(mode="json", exclude_defaults=True)
        written["input"] = model.input.model_dump(mode="json", exclude_none=True)  # every field, for the reader
        (staging / "model.json").write_text(json.dumps(written, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Staged(staging, home, version)


def next_version(home: Path) -> str:
    """1 for a new model; one past the newest otherwise (a model kept flat is version 1)."""
    if not home.exists():
        return loader.FLAT_VERSION
    numbered = [int(p.name) for p in home.iterdir() if p.is_dir() and re.fullmatch(VERSION_FOLDER, p.name)]
    if (home / "model.json").is_file():
        numbered.append(1)
    return str(max(numbered, default=0) + 1)


def _flat_to_version_one(home: Path) -> None:
    """A flat model's files into ``home/1``: linked there first, then model.json removed (from that
    moment the repository sees versions), then the rest."""
    first = home.parent / f"{STAGING}{home.name}-1-{os.getpid()}"
    first.mkdir()
    for path in home.iterdir():
        if path.is_file():
            os.link(path, first / path.name)
    first.rename(home / loader.FLAT_VERSION)
    (home / "model.json").unlink()
    for path in home.iterdir():
        if path.is_file():
            path.unlink()


def _copy_onnx(onnx_file: Path, folder: Path) -> None:
    shutil.copyfile(onnx_file, folder / "model.onnx")
    proto = onnx.load(str(onnx_file), load_external_data=False)
    for tensor in proto.graph.initializer:
        if onnx.external_data_helper.uses_external_data(tensor):
            location = {e.key: e.value for e in tensor.external_data}["location"]
            (folder / location).parent.mkdir(parents=True, exist_ok=True)
            if not (folder / location).exists():
                shutil.copyfile(onnx_file.parent / location, folder / location)
