"""The framework side of ``cnnserve import``: a torchvision or timm architecture with local weights,
a TorchScript or exported-program file, or a local Hugging Face image-classification folder ->
an ONNX file, the preprocessing and labels its framework records, and the framework's own
answers for the check (app/serving/check.py) to hold the served ones to.

Preprocessing is read where each framework keeps it (torchvision's weights' ``transforms()``,
timm's ``pretrained_cfg``, the folder's ``preprocessor_config.json``), never guessed; the
reference runs that same preprocessing and the PyTorch model on each photo. The export is the
maintained one (torch.onnx's dynamo exporter, as training/export.py uses), checked against
PyTorch before anything is written. Nothing is downloaded: weights and folders are local files.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.importing import Exported
from app.serving import importer, preprocess
from app.serving.presets import on_pixel_scale
from app.serving.spec import InputSpec, ModelSpec, Source
from training.export import OPSET, check_graph, check_parity, to_onnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only, never the hub
PARITY_BATCH = 8
# PIL's filter numbers, as Hugging Face processors record ``resample``
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def export(
    source: Path,
    workdir: Path,
    *,
    torchvision: str | None = None,
    timm: str | None = None,
    size: tuple[int, int] | None = None,
) -> Exported:
    """``source`` exported to ``workdir/model.onnx``, with what its framework knows; ``size`` is
    the input's height and width where the framework does not record it (TorchScript)."""
    if torchvision:
        model, found = from_torchvision(torchvision, source)
    elif timm:
        model, found = from_timm(timm, source)
    elif source.is_dir():
        model, found = from_huggingface(source)
    else:
        model, found = from_program(source)
    height, width = size or (found.preprocessing.get("height", 224), found.preprocessing.get("width", 224))
    onnx_file = workdir / "model.onnx"
    if isinstance(model, torch.export.ExportedProgram):  # traced already, its batch dynamic or not
        (_, _, height, width), *_ = (tuple(x.shape) for x in model.example_inputs[0])
        exported = torch.onnx.export(
            model, input_names=["input"], output_names=["logits"], opset_version=OPSET, dynamo=True
        )
        exported.save(str(onnx_file), external_data=False)
        check_graph(onnx_file)
        model = model.module()
    elif isinstance(model, torch.jit.ScriptModule):
        script_to_onnx(model, torch.zeros(2, 3, height, width), onnx_file)
    else:
        to_onnx(model, torch.zeros(2, 3, height, width), onnx_file)  # batch 1 would let the exporter specialise on it
    inputs = np.random.default_rng(0).standard_normal((PARITY_BATCH, 3, height, width), np.float32)
    check_parity(model, onnx_file, inputs)
    found.onnx = onnx_file
    return found


def script_to_onnx(module: torch.jit.ScriptModule, example: torch.Tensor, path: Path) -> None:
    """A TorchScript module through the TorchScript exporter: the dynamo exporter refuses
    ScriptModules, and converting one to an exported program would fix its batch size."""
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; its files are still read
        warnings.simplefilter("ignore", category=(FutureWarning, DeprecationWarning, UserWarning))
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    check_graph(path)


# -- the sources ----------------------------------------------------------------------------------


def from_torchvision(arch: str, weights_file: Path) -> tuple[torch.nn.Module, Exported]:
    import torchvision

    state = load_state(weights_file)
    model = torchvision.models.get_model(arch, weights=None, num_classes=classes_of(state))
    model.load_state_dict(state)
    model.eval()
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    transform = weights.transforms()
    categories = weights.meta.get("categories")
    return model, Exported(
        onnx=weights_file,
        source=Source(
            architecture=arch,
            dataset="ImageNet (ILSVRC-2012)" if categories and len(categories) == classes_of(state) else "unknown",
            pretrained=str(weights_file.resolve()),
            framework=f"torchvision {torchvision.__version__}",
            command=f"cnnserve import {weights_file} --torchvision {arch}",
        ),
        framework="torchvision",
        preprocessing=torchvision_preprocessing(transform),
        labels=list(categories) if categories and len(categories) == classes_of(state) else None,
        reference=lambda spec: framework_answers(model, lambda image: transform(image)),
    )


def torchvision_preprocessing(transform: Any) -> dict[str, Any]:
    """torchvision's ImageClassification transform (its weights' evaluation preprocessing) as
    InputSpec fields."""
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return {
        "color": "RGB",
        "height": crop,
        "width": crop,
        "resize": resize,
        "interpolation": transform.interpolation.value,
        "mean": on_pixel_scale(transform.mean),
        "std": on_pixel_scale(transform.std),
    }


def from_timm(arch: str, weights_file: Path) -> tuple[torch.nn.Module, Exported]:
    import timm
    import timm.data

    state = load_state(weights_file)
    model = timm.create_model(arch, pretrained=False, num_classes=classes_of(state))
    model.load_state_dict(state)
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    classes = classes_of(state)
    return model, Exported(
        onnx=weights_file,
        source=Source(
            architecture=arch,
            dataset="ImageNet (ILSVRC-2012)" if classes == len(importer.imagenet_labels()) else "unknown",
            pretrained=str(weights_file.resolve()),
            framework=f"timm {timm.__version__}",
            command=f"cnnserve import {weights_file} --timm {arch}",
        ),
        framework="timm",
        preprocessing=timm_preprocessing(config),
        labels=importer.imagenet_labels() if classes == len(importer.imagenet_labels()) else None,
        reference=lambda spec: framework_answers(model, lambda image: transform(image)),
    )


def timm_preprocessing(config: dict[str, Any]) -> dict[str, Any]:
    """timm's resolved data config (from the model's pretrained_cfg) as InputSpec fields: the
    shorter side floor(size / crop_pct), then the centre crop."""
    _, height, width = config["input_size"]
    if config.get("crop_mode", "center") != "center":
        raise importer.ImportRefused(f"timm crop_mode {config['crop_mode']!r}: the service crops at the centre only")
    return {
        "color": "RGB",
        "height": height,
        "width": width,
        "resize": math.floor(min(height, width) / config["crop_pct"]),
        "interpolation": config["interpolation"],
        "mean": on_pixel_scale(config["mean"]),
        "std": on_pixel_scale(config["std"]),
    }


class Logits(torch.nn.Module):
    """A Hugging Face classifier as a module from pixels to logits (its output is a dataclass)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(pixel_values=pixels).logits
        return logits


def from_huggingface(folder: Path) -> tuple[torch.nn.Module, Exported]:
    import transformers

    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise importer.ImportRefused(f"{folder} is not a Hugging Face image-classification folder: {error}") from None
    model.eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    wrapped = Logits(model).eval()

    def prepare(image: Image.Image) -> torch.Tensor:
        pixels: torch.Tensor = processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels

    return wrapped, Exported(
        onnx=folder,
        source=Source(
            architecture=type(model).__name__,
            dataset="unknown",
            pretrained=str(folder.resolve()),
            framework=f"transformers {transformers.__version__}",
            command=f"cnnserve import {folder}",
        ),
        framework="transformers",
        preprocessing=huggingface_preprocessing(processor),
        labels=labels,
        reference=lambda spec: framework_answers(wrapped, prepare),
    )


def huggingface_preprocessing(processor: Any) -> dict[str, Any]:
    """An image processor's config as InputSpec fields: ``size`` (a shortest edge, or a height and
    width), the centre crop (``crop_size``, or ConvNeXt's ``crop_pct`` below 384 pixels), the
    filter, and mean and std on the 0..255 scale (``rescale_factor`` 1/255 then normalise)."""
    size = dict(processor.size)
    if getattr(processor, "do_rescale", True) and abs(getattr(processor, "rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise importer.ImportRefused(f"rescale_factor {processor.rescale_factor}: the service takes pixels to 0..1")
    mean = on_pixel_scale(processor.image_mean) if processor.do_normalize else [0.0] * 3
    std = on_pixel_scale(processor.image_std) if processor.do_normalize else [255.0] * 3
    fields: dict[str, Any] = {
        "color": "RGB",
        "interpolation": filter_name(processor.resample),
        "mean": mean,
        "std": std,
    }
    if "shortest_edge" in size:
        edge = size["shortest_edge"]
        crop_pct = getattr(processor, "crop_pct", None)
        if crop_pct is not None and edge < 384:  # ConvNeXt's: resize to edge / crop_pct, crop edge
            fields.update(height=edge, width=edge, resize=int(edge / crop_pct))
        else:
            crop = dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else None
            side = crop["height"] if crop else edge
            fields.update(height=side, width=side, resize=edge if crop else None)
    else:
        fields.update(height=size["height"], width=size["width"], resize=None)
        if getattr(processor, "do_center_crop", False):
            crop = dict(processor.crop_size)
            fields.update(height=crop["height"], width=crop["width"], resize=min(size["height"], size["width"]))
    return fields


def filter_name(resample: Any) -> str:
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return value.lower()
    return PIL_FILTERS.get(int(value), "bilinear")


def from_program(path: Path) -> tuple[torch.nn.Module | torch.export.ExportedProgram, Exported]:
    """A TorchScript file (.pt) or an exported program (.pt2): the module alone, with no record
    of its preprocessing (give --preset or the flags); the check holds the served answers to the
    module's own on the served tensors."""
    try:
        program = torch.export.load(str(path)) if path.suffix == ".pt2" else None
        with warnings.catch_warnings():  # torch.jit.load is deprecated upstream, and still the way to read a .pt
            warnings.simplefilter("ignore", category=FutureWarning)
            module: torch.nn.Module = program.module() if program is not None else torch.jit.load(str(path))
    except Exception as error:  # torch raises several unrelated types for a file it cannot read
        raise importer.ImportRefused(f"{path} is neither a TorchScript file nor an exported program: {error}") from None
    kind = "exported program" if path.suffix == ".pt2" else "TorchScript"

    def reference(spec: InputSpec) -> Callable[[Path], np.ndarray]:
        def answers(image: Path) -> np.ndarray:
            with torch.no_grad():
                batch = torch.from_numpy(preprocess.prepare(image.read_bytes(), spec, 10**9))
                return np.asarray(module(batch)[0].numpy(), dtype=np.float64)

        return answers

    return program or module, Exported(
        onnx=path,
        source=Source(
            architecture=kind, dataset="unknown", pretrained=str(path.resolve()), framework=f"torch {torch.__version__}"
        ),
        framework=f"the {kind}",
        reference=reference,
    )


# -- the framework's answers ----------------------------------------------------------------------


def framework_answers(
    model: torch.nn.Module, transform: Callable[[Image.Image], torch.Tensor]
) -> Callable[[Path], np.ndarray]:
    """An image file -> the framework's logits: its own preprocessing on the decoded photo (EXIF
    orientation applied, RGB, as the service decodes it), then the PyTorch model."""

    def answers(path: Path) -> np.ndarray:
        from PIL import ImageOps

        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        with torch.no_grad():
            return np.asarray(model(transform(image)[None])[0].numpy(), dtype=np.float64)

    return answers


def reference_from_source(spec: ModelSpec) -> tuple[Callable[[Path], np.ndarray] | None, str | None]:
    """For ``cnnserve check``: the framework's answers for a model ``import`` brought from one,
    rebuilt from what model.json's source recorded, when its files are still there."""
    recorded = spec.source
    path = Path(recorded.pretrained) if recorded.pretrained else None
    if not recorded.framework or path is None or not path.exists():
        return None, None
    family = recorded.framework.split()[0]
    if family == "torchvision":
        _, found = from_torchvision(recorded.architecture, path)
    elif family == "timm":
        _, found = from_timm(recorded.architecture, path)
    elif family == "transformers":
        _, found = from_huggingface(path)
    else:
        _, found = from_program(path)
    assert found.reference is not None
    return found.reference(spec.input), found.framework


# -- weights --------------------------------------------------------------------------------------


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt file (tensors only: ``weights_only``) or a .safetensors file;
    a checkpoint that wraps it under ``state_dict`` or ``model`` is unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise importer.ImportRefused(f"{path}: no such file") from None
    except Exception as error:  # pickle and safetensors raise several types
        raise importer.ImportRefused(f"{path} is not a weights file torch can read safely: {error}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise importer.ImportRefused(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def classes_of(state: dict[str, torch.Tensor]) -> int:
    """The class count: the rows of the last two-dimensional weight (the classifier's)."""
    matrices = [value for key, value in state.items() if key.endswith("weight") and value.ndim == 2]
    if not matrices:
        raise importer.ImportRefused("the weights hold no linear classifier")
    return int(matrices[-1].shape[0])
