"""How large a network is built and how large an image it is run on: bounds on memory.

An FCN takes an image of any size, and its activations grow with the pixels: a
photo of tens of megapixels needs tens of gigabytes, more than most machines have.
Predict, evaluate and the registered model refuse larger images than the limit,
with a message saying so (fcn predict can instead downscale them: fitting_size).

    MAX_PIXELS                       the default limit: 2048 x 2048 pixels
    DOWNSCALE_FACTOR                 fcn predict --downscale reads images of at most this many
    downscale_limit(limit)           times the limit (the mask and overlay are written at full size)
    json_body_limit(limit)           the largest request body `fcn serve` reads: the JSON of an
                                     RGB image of `limit` pixels, with room for whitespace
    META_KEY                         where a checkpoint's meta.json keeps its own limit
    too_large(height, width, limit)  None, or why the image is refused
    fitting_size(height, width, limit)  the largest size of the same shape within the limit
    MAX_WIDTH                        the widest trunk built (channel scale): 4.0, a VGG16 FCN of
                                     2.1 billion weights (8.6 GB); params, meta.json and imports obey it
"""
from __future__ import annotations

import math

MAX_PIXELS = 2048 * 2048
# Every width in (0, MAX_WIDTH] builds; a wider one is refused before anything is allocated.
MAX_WIDTH = 4.0
META_KEY = "max_pixels"
# --downscale still holds the whole image, its full-size mask and overlay in memory: a
# bound of its own, a multiple of the limit (8 x 2048 x 2048 by default, 33.6 megapixels).
DOWNSCALE_FACTOR = 8


# Bytes of JSON per pixel: json.dumps writes "[255, 255, 255], " (17); room for other spacing.
JSON_BYTES_PER_PIXEL = 24
# The rest of a request: {"inputs": ...}, row brackets, params.
JSON_OVERHEAD = 1 << 20


def json_body_limit(limit: int) -> int:
    """The most bytes of a request body the scoring server reads for a model of this pixel limit."""
    return limit * JSON_BYTES_PER_PIXEL + JSON_OVERHEAD


def downscale_limit(limit: int) -> int:
    """The most pixels an image fcn predict --downscale reads may have, given the pixel limit."""
    return DOWNSCALE_FACTOR * limit


def _amount(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels" if pixels >= 100_000 else f"{pixels} pixels"


def too_large(height: int, width: int, limit: int) -> str | None:
    """None when an image of height x width fits the limit, else the reason it does not."""
    if height * width <= limit:
        return None
    exact = f" ({limit} pixels)" if limit >= 100_000 else ""
    return f"{width}x{height} is {_amount(height * width)}, more than the limit of {_amount(limit)}{exact}"


def fitting_size(height: int, width: int, limit: int) -> tuple[int, int]:
    """(height, width) scaled down by one factor so that height x width <= limit (at least 1 x 1)."""
    if height * width <= limit:
        return height, width
    scale = math.sqrt(limit / (height * width))
    h, w = max(1, int(height * scale)), max(1, int(width * scale))
    while h * w > limit:  # rounding can leave one row too many
        h, w = (h - 1, w) if h >= w else (h, w - 1)
    return h, w
