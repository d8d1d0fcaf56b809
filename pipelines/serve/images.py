"""Image files in and out: reading a photo as RGB pixels, writing masks as palette PNGs.

    read_image(path, max_pixels)     (H, W, 3) uint8 RGB, upright as its EXIF orientation says
    decode_image(data, name, limit)  the same from a file's bytes (name names it in errors)
    resized(image, (h, w))           an RGB image at another size; resized_mask: a mask, by nearest neighbour
    mask_image(mask)                 a PIL palette image: pixel values are class ids, colours the VOC ones
    save_png(image, path)            written whole or not at all
    class_shares(mask)               (class id, name, percent of pixels) of each class present, largest first

Pixels of 16 bits (grayscale PNGs: PIL's I;16 modes) are scaled to 8 bits, not
clipped; 32-bit integer and floating-point images have no range to scale from and
are refused. The size is checked from the file's header, before any pixel is
decoded: an image above max_pixels, or above PIL's own bound against decompression
bombs, costs no memory.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fcn_models import palette
from fcn_models.errors import FCNError
from fcn_models.limits import too_large
from fcn_models.voc import class_names
from pipelines.core.files import atomic_write_bytes

# PIL's modes for 16-bit grayscale (PNG opens as I;16); 0..65535 maps onto 0..255.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageError(FCNError, ValueError):
    """An image file that cannot be used; the message names it and says what to give instead."""


def _to_rgb(image, name: str) -> np.ndarray:
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.uint32)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise ImageError(f"{name}: {kind} pixels (PIL mode {image.mode}) have no range to show as 8-bit RGB: "
                         "convert the image to 8 or 16 bits per channel first")
    return np.asarray(image.convert("RGB"))


def read_image(path: Path, max_pixels: int | None = None, too_large_advice: str | None = None,
               limit_name: str = "inference.max_pixels") -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, upright as its EXIF orientation says.

    max_pixels: refuse (ImageError) an image with more pixels, naming limit_name; None: only PIL's bound."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file (give image files)")
    return decode_image(path, str(path), max_pixels, too_large_advice or SCALE_DOWN, limit_name)


# What to do with an image above the limit, for `fcn predict`, which can downscale.
SCALE_DOWN = "scale it down first, or pass --downscale to predict it at a smaller size"


def decode_image(data, name: str, max_pixels: int | None = None, too_large_advice: str = SCALE_DOWN,
                 limit_name: str = "inference.max_pixels") -> np.ndarray:
    """An encoded image (a path, or the file's bytes) as (H, W, 3) uint8 RGB, upright; `name` in errors."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with Image.open(source) as image:
            width, height = image.size
            if max_pixels is not None and too_large(height, width, max_pixels):
                raise ImageError(f"{name}: {too_large(height, width, max_pixels)} ({limit_name}): "
                                 f"{too_large_advice}")
            if Image.MAX_IMAGE_PIXELS and height * width > Image.MAX_IMAGE_PIXELS:
                raise ImageError(f"{name}: {width}x{height} pixels is more than any image this reads "
                                 f"({Image.MAX_IMAGE_PIXELS} pixels, PIL's bound against decompression bombs)")
            return _to_rgb(ImageOps.exif_transpose(image), name)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image PIL can read (give a JPEG, PNG or other image file)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, ImageError):
            raise
        raise ImageError(f"{name}: cannot read the image: {err}") from None


def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, 3) uint8 image at (height, width), by area-weighted (antialiased) resampling."""
    from PIL import Image

    height, width = size
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BOX))


# What segmenting one image writes: <name>_mask.png (class ids) and <name>_overlay.png.
MASK_SUFFIX, OVERLAY_SUFFIX = "_mask.png", "_overlay.png"


def written_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """(mask, overlay) paths of the image called `name` in out_dir."""
    return Path(out_dir) / f"{name}{MASK_SUFFIX}", Path(out_dir) / f"{name}{OVERLAY_SUFFIX}"


def resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask of class ids at (height, width), by nearest neighbour: no class is blended into another."""
    from PIL import Image

    height, width = size
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST))


# zlib level 1: an overlay (a photo, which PNG compresses poorly at any level) encodes
# far faster than at PIL's default 6, for a file about a tenth larger; a mask's
# flat regions compress well at any level.
PNG_COMPRESS_LEVEL = 1


def save_png(image, path: Path) -> None:
    """Write a PIL image as PNG, all or nothing."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
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
