"""Real photos that ship with scikit-image and matplotlib, and the preprocessing model.json names.

The preprocessing here is the training side's reading of an InputSpec; the service implements the
same spec on its own (it never imports training), and the tests hold the two to the same top-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def sample_photos() -> dict[str, Path]:
    """Named photo files on disk: skimage's chelsea, coffee, astronaut, rocket; matplotlib's Grace Hopper."""
    import matplotlib
    import skimage.data

    skimage_dir = Path(skimage.data.__file__).parent
    photos = {name: skimage_dir / f"{name}.png" for name in ("chelsea", "coffee", "astronaut")}
    photos["rocket"] = skimage_dir / "rocket.jpg"
    photos["grace_hopper"] = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return photos


def preprocess(path: Path, spec: dict) -> np.ndarray:
    """One image file -> (1, C, H, W) float32, as the InputSpec ``spec`` describes."""
    image = ImageOps.exif_transpose(Image.open(path))
    image = image.convert("RGB" if spec["color"] == "BGR" else spec["color"])
    height, width = spec["height"], spec["width"]
    resample = _RESAMPLE[spec["interpolation"]]
    if spec.get("resize"):
        image = resize_shorter(image, spec["resize"], resample)
        image = centre_crop(image, height, width)
    else:
        image = image.resize((width, height), resample)
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if spec["color"] == "BGR":
        pixels = pixels[:, :, ::-1]
    pixels = (pixels - np.float32(spec["mean"])) / np.float32(spec["std"])
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32)


def resize_shorter(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """torchvision's Resize(int): the shorter side becomes ``size``, the longer keeps the ratio."""
    w, h = image.size
    if w <= h:
        return image.resize((size, int(size * h / w)), resample)
    return image.resize((int(size * w / h), size), resample)


def centre_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's CenterCrop rounding: top = round((H - h) / 2)."""
    w, h = image.size
    top, left = round((h - height) / 2.0), round((w - width) / 2.0)
    return image.crop((left, top, left + width, top + height))
