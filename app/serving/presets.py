"""What ``cnnserve import`` assumes when told little: named preprocessing (what common training
recipes fed their networks, written on model.json's 0..255 pixel scale so that nobody converts a
std by hand), the built-in label list, and how far the check lets logits move. Light to import:
the command line reads these before anything loads ONNX Runtime.

A preset gives every InputSpec field but the tensor's name and layout, which come from the graph.
"""

from __future__ import annotations

import math
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_SCALE = 255.0
BUILTIN_LABELS = "imagenet"  # --labels imagenet: the 1,000 classes, from models/efficientnet_lite0
# Logits may differ from the framework's by this fraction of their spread over the classes (max -
# min): the served resize's one-grey-level differences (app/serving/preprocess.py) move them far
# less; a wrong preprocessing step moves them by tenths of the spread or more.
TOLERANCE = 0.02


def on_pixel_scale(values: tuple[float, ...] | list[float]) -> list[float]:
    """0..1 values (torchvision's, timm's, Hugging Face's mean and std) on the 0..255 scale."""
    return [round(v * PIXEL_SCALE, 6) for v in values]


def resize_for(size: int, crop_pct: float) -> int:
    """The shorter side before the centre crop, as timm computes it: floor(size / crop_pct)."""
    return math.floor(size / crop_pct)


PRESETS: dict[str, dict[str, Any]] = {
    # torchvision's and timm's ImageNet evaluation: shorter side 256, centre crop 224
    "imagenet": {
        "color": "RGB",
        "height": 224,
        "width": 224,
        "resize": 256,
        "interpolation": "bilinear",
        "mean": on_pixel_scale(IMAGENET_MEAN),
        "std": on_pixel_scale(IMAGENET_STD),
    },
    # Inception v3 and the TensorFlow-trained families: x / 127.5 - 1 at 299 (torchvision resizes to 342)
    "inception": {
        "color": "RGB",
        "height": 299,
        "width": 299,
        "resize": 342,
        "interpolation": "bilinear",
        "mean": [127.5] * 3,
        "std": [127.5] * 3,
    },
    # EfficientNet-Lite (TensorFlow Lite's): (x - 127) / 128
    "efficientnet-lite": {
        "color": "RGB",
        "height": 224,
        "width": 224,
        "resize": 256,
        "interpolation": "bilinear",
        "mean": [127.0] * 3,
        "std": [128.0] * 3,
    },
    # Caffe's ResNets and VGGs: BGR, the channel means subtracted, no scaling
    "caffe": {
        "color": "BGR",
        "height": 224,
        "width": 224,
        "resize": 256,
        "interpolation": "bilinear",
        "mean": [103.939, 116.779, 123.68],
        "std": [1.0] * 3,
    },
    # MNIST-style 28x28 grey images on 0..1
    "grayscale-28": {
        "color": "L",
        "height": 28,
        "width": 28,
        "resize": None,
        "interpolation": "bilinear",
        "mean": [0.0],
        "std": [255.0],
    },
}
