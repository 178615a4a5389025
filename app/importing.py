"""``cnnserve import`` and ``cnnserve check``: bring a classifier into the repository, checked.

An ONNX file is imported here, without torch. A PyTorch, timm or Hugging Face model is exported
by training/importer.py (the training extra) into an ONNX file plus the preprocessing, labels and
reference answers its framework records, and then goes the same way: model.json written beside
the file in a hidden folder, the folder loaded and checked as the service will load it, and only
then put in place (a polling server picks it up; ``--url`` asks a running one to load it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Settings
from app.serving.presets import BUILTIN_LABELS, PRESETS, TOLERANCE

if TYPE_CHECKING:  # the command line imports this module; ONNX Runtime loads only when a command runs
    from app.serving import check
    from app.serving.spec import InputSpec, Source

Reference = Callable[[Path], Any]  # app.serving.check.Reference: an image file -> the framework's logits
FRAMEWORK_SUFFIXES = (".pt", ".pth", ".pt2", ".safetensors", ".bin", ".ckpt")


@dataclass
class Exported:
    """What training/importer.py hands over: an ONNX file and what the framework knows about it."""

    onnx: Path
    source: Source
    framework: str
    preprocessing: dict[str, Any] = field(default_factory=dict)  # InputSpec fields, 0..255 scale
    labels: list[str] | None = None
    reference: Callable[[InputSpec], Reference] | None = None  # the framework's answers


def add_commands(commands: Any) -> None:
    """The ``import`` and ``check`` subcommands of ``cnnserve``."""
    bring = commands.add_parser(
        "import",
        help="add a classifier to the model repository from ONNX, PyTorch, timm or Hugging Face, checked",
        description="Write a complete model folder (or the next version of an existing model): model.onnx, "
        "model.json with the preprocessing and labels, its sha256. The folder is loaded as the service will "
        "load it and checked on sample photos before it is put in place; with the framework installed, the "
        "served answers must equal the framework's own preprocessing and model (top-5 equal, logits within "
        "the tolerance), or the import is refused with the step that differs.",
        epilog="Sources: model.onnx; --torchvision ARCH or --timm ARCH with a local weights file (.pth, "
        ".safetensors); a TorchScript (.pt) or exported-program (.pt2) file; a local Hugging Face "
        "image-classification folder (config.json, weights, preprocessor_config.json). Nothing is downloaded.",
    )
    bring.add_argument(
        "source", type=Path, help="the ONNX file, weights file, TorchScript/.pt2 file or Hugging Face folder"
    )
    bring.add_argument("--name", required=True, help="the model's name in the repository (its folder)")
    family = bring.add_mutually_exclusive_group()
    family.add_argument("--torchvision", metavar="ARCH", help="a torchvision architecture, e.g. resnet18")
    family.add_argument("--timm", metavar="ARCH", help="a timm architecture, e.g. resnet18.a1_in1k")
    bring.add_argument("--preset", choices=list(PRESETS), help="named preprocessing (flags below override it)")
    bring.add_argument(
        "--size", type=size, metavar="H[xW]", help="input height and width (needed when the graph's are dynamic)"
    )
    bring.add_argument(
        "--resize", type=resize, metavar="N|none", help="shorter side before the centre crop; none: resize straight"
    )
    bring.add_argument("--interpolation", choices=["nearest", "bilinear", "bicubic", "lanczos"])
    bring.add_argument("--color", choices=["L", "RGB", "BGR"], help="channel order the model was trained on")
    bring.add_argument("--layout", choices=["NCHW", "NHWC"], help="default: read from the graph")
    bring.add_argument("--mean", type=numbers, metavar="A[,B,C]", help="per channel, on the 0..255 scale")
    bring.add_argument("--std", type=numbers, metavar="A[,B,C]", help="per channel, on the 0..255 scale")
    bring.add_argument(
        "--labels", help=f"a text file (one a line), a JSON list or {{index: name}}, or {BUILTIN_LABELS!r}"
    )
    bring.add_argument(
        "--output", help="the output holding the class scores (default: the one of shape (batch, classes))"
    )
    bring.add_argument("--kind", choices=["logits", "probabilities"], default="logits", help="what the output holds")
    bring.add_argument("--description", default="", help="a line for model.json")
    add_check_options(bring)
    bring.add_argument("--url", help="a running service in explicit or poll mode: load the model there at once")
    bring.add_argument("--api-key", help="its API key, if it needs one (default $CNNSERVE_API_KEY)")
    look = commands.add_parser(
        "check",
        help="load a model as the service will and check it on sample photos",
        description="Load NAME from the repository exactly as the service loads it; print the top-5 and the "
        "latency per sample photo, the layers /featuremaps offers and the /explain methods that fit. With the "
        "model's framework installed, hold the answers to the framework's own (as `import` does).",
    )
    look.add_argument("name", help="the model")
    look.add_argument("--version", help="a version folder (default: the newest)")
    add_check_options(look)


def add_check_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models-dir", type=Path, help="the model repository (default $CNNSERVE_MODELS_DIR or models/)"
    )
    parser.add_argument("--image", action="append", type=Path, default=[], help="also check on this image; repeatable")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help=f"logits may differ from the framework's by this fraction of their spread (default {TOLERANCE})",
    )


def size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


def resize(text: str) -> int | str:
    return "none" if text.lower() == "none" else int(text)


def numbers(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def settings_of(args: argparse.Namespace) -> Settings:
    return Settings(models_dir=args.models_dir) if args.models_dir else Settings()


def given_preprocessing(args: argparse.Namespace) -> dict[str, Any]:
    """The preprocessing flags that were given (None: not given; --resize none: no crop)."""
    given: dict[str, Any] = {
        "layout": args.layout,
        "interpolation": args.interpolation,
        "color": args.color,
        "mean": args.mean,
        "std": args.std,
    }
    if args.size:
        given["height"], given["width"] = args.size
    if args.resize is not None:
        given["resize"] = args.resize
    return given


def export_from_framework(args: argparse.Namespace, workdir: Path) -> Exported | None:
    """A framework source exported to ONNX by training/importer.py; None for an ONNX file."""
    from app.serving import importer

    source: Path = args.source
    if not (args.torchvision or args.timm or source.is_dir() or source.suffix in FRAMEWORK_SUFFIXES):
        return None
    try:
        framework = importlib.import_module("training.importer")  # torch: not for mypy to follow
    except ImportError as missing:
        raise importer.ImportRefused(
            f"importing {source} needs PyTorch ({missing}): pip install 'cnnserve[train]', or export it to ONNX first"
        ) from None
    exported: Exported = framework.export(source, workdir, torchvision=args.torchvision, timm=args.timm, size=args.size)
    return exported


def run_import(args: argparse.Namespace) -> int:
    from app.serving import check, importer
    from app.serving.errors import ServingError
    from app.serving.spec import Source

    settings = settings_of(args)
    try:
        with tempfile.TemporaryDirectory(prefix="cnnserve-import-") as work:
            if args.torchvision or args.timm or args.source.is_dir() or args.source.suffix in FRAMEWORK_SUFFIXES:
                say(f"exporting {args.source} to ONNX and checking the export against PyTorch ...")
            exported = export_from_framework(args, Path(work))
            onnx_file = exported.onnx if exported else args.source
            facts = importer.read_graph(onnx_file, args.output)
            importer.check_runtime(onnx_file)
            given = given_preprocessing(args)
            fields = {
                **(exported.preprocessing if exported else {}),
                **{k: v for k, v in given.items() if v is not None},
            }
            spec = importer.input_spec(facts, args.preset, **fields)
            if exported and exported.labels and not args.labels:
                labels = importer.counted(exported.labels, facts.classes)
            else:
                labels = importer.read_labels(args.labels, facts.classes)
            source = (
                exported.source
                if exported
                else Source(architecture=args.name, dataset="unknown", command=command_of(args))
            )
            staged = importer.stage_model(
                settings.models_dir,
                args.name,
                onnx_file,
                spec,
                facts,
                labels,
                source,
                kind=args.kind,
                description=args.description,
            )
            say(f"loading {args.name} version {staged.version} as the service will, and checking it on the photos ...")
            try:
                reference = exported.reference(spec) if exported and exported.reference else None
                report = check.check(
                    staged.folder,
                    args.name,
                    staged.version,
                    settings,
                    check.sample_photos(args.image),
                    reference,
                    exported.framework if exported else None,
                    args.tolerance,
                )
            except BaseException:
                staged.discard()
                raise
            folder = staged.commit()
    except ServingError as refused:
        print(f"cnnserve import: refused: {refused}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    print(f"wrote {folder}")
    if args.url:
        return load_on_server(args.url, args.api_key, args.name)
    return 0


def say(step: str) -> None:
    """Progress on stderr, so that stdout holds only the report."""
    print(step, file=sys.stderr, flush=True)


def load_on_server(url: str, api_key: str | None, name: str) -> int:
    """Ask a running service (explicit or poll mode) to load the model now."""
    import httpx

    key = api_key or Settings().api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{url.rstrip('/')}/v2/repository/models/{name}/load", headers=headers, timeout=120)
    if response.status_code != 200:
        print(f"the service at {url} did not load {name}: {response.status_code} {response.text}", file=sys.stderr)
        return 1
    print(f"loaded on {url}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from app.serving import check, loader
    from app.serving.errors import ServingError

    settings = settings_of(args)
    try:
        repository = settings.models_dir / args.name
        folder, version = version_folder(repository, args.version)
        spec = loader.read_spec(folder, args.name)
        reference, framework = framework_reference(spec)
        report = check.check(
            folder, args.name, version, settings, check.sample_photos(args.image), reference, framework, args.tolerance
        )
    except (ServingError, loader.ModelRefused) as refused:
        print(f"cnnserve check: {args.name}: {refused}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0


def version_folder(home: Path, version: str | None) -> tuple[Path, str]:
    from app.serving import check, loader

    if not home.is_dir():
        raise check.CheckFailed(f"no model folder {home}")
    if (home / "model.json").is_file() and version in (None, loader.FLAT_VERSION):
        return home, loader.FLAT_VERSION
    numbered = sorted(int(p.name) for p in home.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit())
    chosen = version or (str(numbered[-1]) if numbered else None)
    if chosen is None or not (home / chosen).is_dir():
        raise check.CheckFailed(f"{home.name} has no version {version or ''} (versions: {numbered or [1]})")
    return home / chosen, chosen


def framework_reference(spec: Any) -> tuple[Reference | None, str | None]:
    """The framework's own answers for a model imported from one, when it is installed here."""
    try:
        framework = importlib.import_module("training.importer")
    except ImportError:
        return None, None
    found: tuple[check.Reference | None, str | None] = framework.reference_from_source(spec)
    return found


def command_of(args: argparse.Namespace) -> str:
    """The import as a command line, from what was given (model.json's source.command)."""
    flags = ("preset", "size", "resize", "interpolation", "color", "layout", "mean", "std", "labels", "output")
    words = ["cnnserve", "import", str(args.source), "--name", args.name]
    for flag in flags:
        value = getattr(args, flag)
        if isinstance(value, tuple):  # --size
            words += [f"--{flag}", "x".join(map(str, value))]
        elif isinstance(value, list):  # --mean, --std
            words += [f"--{flag}", ",".join(f"{x:g}" for x in value)]
        elif value is not None:
            words += [f"--{flag}", str(value)]
    if args.kind != "logits":
        words += ["--kind", args.kind]
    return " ".join(words)
