"""Image files in and out: reading a photo as RGB pixels, writing masks as palette PNGs.

    read_image(path, max_pixels)  (H, W, 3) uint8 RGB, upright as its EXIF orientation says
    resized(image, (h, w))        an RGB image at another size; resized_mask: a mask, by nearest neighbour
    mask_image(mask)              a PIL palette image: pixel values are class ids, colours the VOC ones
    save_png(image, path)         written whole or not at all

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
from fcn_models.limits import too_large
from pipelines.files import atomic_write_bytes

# PIL's modes for 16-bit grayscale (PNG opens as I;16); 0..65535 maps onto 0..255.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageError(ValueError):
    """An image file that cannot be used; the message names it and says what to give instead."""


def _to_rgb(image, path: Path) -> np.ndarray:
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.uint32)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise ImageError(f"{path}: {kind} pixels (PIL mode {image.mode}) have no range to show as 8-bit RGB: "
                         "convert the image to 8 or 16 bits per channel first")
    return np.asarray(image.convert("RGB"))


def read_image(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, upright as its EXIF orientation says.

    max_pixels: refuse (ImageError) an image with more pixels; None: only PIL's bound."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file (give image files)")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels is not None and too_large(height, width, max_pixels):
                raise ImageError(f"{path}: {too_large(height, width, max_pixels)} (inference.max_pixels): "
                                 "scale it down first, or pass --downscale to predict it at a smaller size")
            if Image.MAX_IMAGE_PIXELS and height * width > Image.MAX_IMAGE_PIXELS:
                raise ImageError(f"{path}: {width}x{height} pixels is more than any image this reads "
                                 f"({Image.MAX_IMAGE_PIXELS} pixels, PIL's bound against decompression bombs)")
            return _to_rgb(ImageOps.exif_transpose(image), path)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image PIL can read (give a JPEG, PNG or other image file)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, ImageError):
            raise
        raise ImageError(f"{path}: cannot read the image: {err}") from None


def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, 3) uint8 image at (height, width), by area-weighted (antialiased) resampling."""
    from PIL import Image

    height, width = size
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BOX))


def resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask of class ids at (height, width), by nearest neighbour: no class is blended into another."""
    from PIL import Image

    height, width = size
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST))


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
