"""Image files in and out: reading a photo as RGB pixels, writing masks as palette PNGs.

    read_image(path)      (H, W, 3) uint8 RGB, upright as its EXIF orientation says
    decode_image(data, n) the same from a file's bytes (n names it in errors)
    mask_image(mask)      a PIL palette image: pixel values are class ids, colours the VOC ones
    save_png(image, path) written whole or not at all
    class_shares(mask)    (class id, name, percent of pixels) of each class present, largest first
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fcn_models import palette
from fcn_models.voc import class_names
from pipelines.files import atomic_write_bytes


class ImageError(ValueError):
    """An image file that cannot be used; the message names it and says what to give instead."""


def read_image(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, upright as its EXIF orientation says."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file (give image files)")
    return decode_image(path, str(path))


def decode_image(data, name: str) -> np.ndarray:
    """An encoded image (a path, or the file's bytes) as (H, W, 3) uint8 RGB, upright; `name` in errors."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with Image.open(source) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image PIL can read (give a JPEG, PNG or other image file)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{name}: cannot read the image: {err}") from None


def save_png(image, path: Path) -> None:
    """Write a PIL image as PNG, all or nothing."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def mask_image(mask: np.ndarray):
    """The mask as a palette PNG image: values are class ids, colours the VOC ones."""
    from PIL import Image

    image = Image.fromarray(mask.astype(np.uint8))
    image.putpalette(palette.voc_colormap(256).ravel().tolist())
    return image


def class_shares(mask: np.ndarray) -> list[tuple[int, str, float]]:
    """(class id, name, percent of pixels) for each class present, largest first."""
    names = class_names()
    counts = np.bincount(np.asarray(mask).ravel(), minlength=1)
    present = sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c))
    return [(int(c), names[c] if c < len(names) else f"class {c}", 100.0 * counts[c] / mask.size) for c in present]
