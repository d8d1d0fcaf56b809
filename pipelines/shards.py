"""Reading a shard row: the one decoder of the shard contract's image and label bytes.

Training (pipelines.dataset, inside Ray Data), evaluation and tracking all decode
with this, so a sample is the same pixels wherever it is used. Kept free of Ray,
so evaluation does not pay for importing it.
"""
from __future__ import annotations

import cv2
import numpy as np


class ShardError(ValueError):
    """A shard row that breaks the contract; the message names the sample and the fix."""


def decode_sample(sample_id: str, image_bytes: bytes, label_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """JPEG and PNG bytes of one shard row -> (H x W x 3 uint8 RGB image, H x W uint8 label)."""
    image = cv2.imdecode(np.frombuffer(image_bytes or b"", np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ShardError(f"sample {sample_id}: image bytes are not a decodable JPEG (re-run `fcn preprocess`)")
    label = cv2.imdecode(np.frombuffer(label_bytes or b"", np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2 or label.dtype != np.uint8:
        raise ShardError(f"sample {sample_id}: label is not a single-channel 8-bit PNG (re-run `fcn preprocess`)")
    if label.shape != image.shape[:2]:
        raise ShardError(f"sample {sample_id}: label {label.shape} and image {image.shape[:2]} differ in size "
                         "(re-run `fcn preprocess`)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), label
