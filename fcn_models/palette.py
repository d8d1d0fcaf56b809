"""PASCAL VOC colours and class names, and masks drawn with them.

    colorize(mask)            (H, W) class ids -> (H, W, 3) uint8 in the VOC colours
    overlay(image, mask)      the image with the coloured mask blended over it

Pure numpy: used by the mirror generator, tracking artifacts and `fcn predict`.
The class names and the void label come from fcn_models.voc.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .voc import VOID


@lru_cache(maxsize=None)
def _colormap(n: int) -> np.ndarray:
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    cmap.flags.writeable = False
    return cmap


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC label colour map: (n, 3) uint8, index i -> RGB.

    The bits of the index are dealt out to R, G and B from the most significant
    bit down, three at a time, so 1 -> (128, 0, 0) and 255 -> (224, 224, 192).
    """
    return _colormap(n).copy()


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) integer class ids (255 = void) -> (H, W, 3) uint8 RGB in the VOC colours."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask of shape {mask.shape}: expected (H, W) class ids")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"mask values {mask.min()}..{mask.max()}: expected class ids in 0..255")
    return _colormap(256)[mask.astype(np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured mask over an (H, W, 3) uint8 RGB image; background and void stay as they are."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image of shape {image.shape}: expected (H, W, 3) RGB")
    if image.shape[:2] != np.shape(mask):
        raise ValueError(f"image {image.shape[:2]} and mask {np.shape(mask)} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: expected a value in [0, 1]")
    colours = colorize(mask).astype(np.float32)
    out = image.astype(np.float32)
    objects = (np.asarray(mask) != 0) & (np.asarray(mask) != VOID)
    out[objects] = (1 - alpha) * out[objects] + alpha * colours[objects]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
