"""Feature maps and class activation maps as pictures.

Conventions copied from the tools people already read: channels tiled in a near-square grid
(keract, torchvision's make_grid) with thin separators, each channel scaled on its own, signed
maps on a diverging scale symmetric around zero (CNN Explainer), dead channels shown flat rather
than stretched into noise, nearest-neighbour upscaling so a 5x5 map stays legible.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# Anchor colours, interpolated linearly into 256-entry tables (matplotlib's maps, sampled).
COLORMAPS: dict[str, list[tuple[int, int, int]]] = {
    "gray": [(0, 0, 0), (255, 255, 255)],
    "viridis": [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    "magma": [
        (0, 0, 4),
        (28, 16, 68),
        (79, 18, 123),
        (129, 37, 129),
        (181, 54, 122),
        (229, 80, 100),
        (251, 135, 97),
        (254, 194, 135),
        (252, 253, 191),
    ],
    "coolwarm": [(59, 76, 192), (141, 176, 254), (221, 221, 221), (244, 154, 123), (180, 4, 38)],
    "jet": [(0, 0, 128), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (128, 0, 0)],
}
DIVERGING = {"coolwarm"}
SEPARATOR = (96, 96, 96)
TARGET_TILE = 96
MAX_UPSCALE = 16
CLIP_PERCENTILE = 99.5


def lookup_table(name: str) -> np.ndarray:
    anchors = np.array(COLORMAPS[name], dtype=np.float64)
    positions = np.linspace(0, 255, len(anchors))
    levels = np.arange(256)
    return np.stack([np.interp(levels, positions, anchors[:, c]) for c in range(3)], 1).round().astype(np.uint8)


def to_levels(maps: np.ndarray, symmetric: bool) -> np.ndarray:
    """(C, H, W) floats -> uint8, each channel on its own range, clipped at the CLIP_PERCENTILE so
    that a few extreme pixels do not wash out a sparse edge map; a constant channel maps to the
    middle of a diverging scale or to black."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    if symmetric:
        bound = np.percentile(np.abs(flat), CLIP_PERCENTILE, axis=1, keepdims=True)
        low, high = -bound, bound
    else:
        low = np.percentile(flat, 100 - CLIP_PERCENTILE, axis=1, keepdims=True)
        high = np.percentile(flat, CLIP_PERCENTILE, axis=1, keepdims=True)
    span = high - low
    dead = span <= 1e-12 * np.maximum(1.0, np.abs(high))
    scaled = np.where(dead, 0.5 if symmetric else 0.0, (flat - low) / np.where(dead, 1.0, span))
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8).reshape(maps.shape)


def auto_upscale(height: int, width: int) -> int:
    return max(1, min(MAX_UPSCALE, TARGET_TILE // max(height, width)))


def tile(maps: np.ndarray, colormap: str, upscale: int, symmetric: bool) -> np.ndarray:
    """The channels in a grid of ceil(sqrt(C)) columns with 1-pixel separators, as (H, W, 3)."""
    channels, height, width = maps.shape
    levels = lookup_table(colormap)[to_levels(maps, symmetric)]
    if upscale > 1:
        levels = levels.repeat(upscale, 1).repeat(upscale, 2)
    th, tw = height * upscale, width * upscale
    cols = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / cols)
    canvas = np.empty((rows * (th + 1) + 1, cols * (tw + 1) + 1, 3), np.uint8)
    canvas[:] = SEPARATOR
    for c in range(channels):
        r, k = divmod(c, cols)
        canvas[1 + r * (th + 1) : 1 + r * (th + 1) + th, 1 + k * (tw + 1) : 1 + k * (tw + 1) + tw] = levels[c]
    return canvas


def png(pixels: np.ndarray | Image.Image) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def overlay(photo: Image.Image, heat: np.ndarray, alpha: float, colormap: str = "jet") -> Image.Image:
    """A (h, w) map in 0..1, upscaled bicubically to the photo and blended over it."""
    upscaled = Image.fromarray(heat.astype(np.float32), mode="F").resize(photo.size, Image.Resampling.BICUBIC)
    levels = (np.clip(np.asarray(upscaled), 0, 1) * 255).round().astype(np.uint8)
    coloured = Image.fromarray(lookup_table(colormap)[levels])
    return Image.blend(photo.convert("RGB"), coloured, alpha)
