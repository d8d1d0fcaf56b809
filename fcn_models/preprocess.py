"""Input normalisation applied: RGB pixels on the 0-255 scale -> the network's float input.

The normalisations themselves (InputNorm, the presets) are plain data in
fcn_models.norms; `normalize` serves every model, whatever its weights expect.
"""
from __future__ import annotations

import numpy as np
import torch

from .norms import CAFFE_BGR, PRESETS, TORCHVISION_GOOGLENET, TORCHVISION_RGB, InputNorm, NormLike, as_input_norm

__all__ = ["CAFFE_BGR", "PRESETS", "TORCHVISION_GOOGLENET", "TORCHVISION_RGB", "InputNorm", "NormLike",
           "as_input_norm", "normalize", "denormalize"]


def _as_channels_first(image) -> tuple[torch.Tensor, bool]:
    """(N, 3, H, W) float32 tensor of pixel values and whether a batch was given."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4) or image.shape[-1] != 3:
            raise ValueError(
                f"numpy image of shape {image.shape}: expected H x W x 3 or N x H x W x 3 RGB "
                "(convert grayscale or RGBA images to RGB first)"
            )
        batched = image.ndim == 4
        t = torch.from_numpy(np.ascontiguousarray(image if batched else image[None]))
        t = t.permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(
                f"tensor image of shape {tuple(image.shape)}: expected 3 x H x W or N x 3 x H x W RGB"
            )
        batched = image.ndim == 4
        t = image if batched else image[None]
    else:
        raise TypeError(f"cannot normalise a {type(image).__name__}: give a numpy array or a torch tensor")
    return t.to(torch.float32), batched


def normalize(image, norm: NormLike) -> torch.Tensor:
    """RGB pixel values on the 0-255 scale -> the network's float32 input.

    `image` is a numpy array H x W x 3 (or N x H x W x 3), e.g. uint8 from a
    decoded JPEG, or a tensor 3 x H x W (or N x 3 x H x W), of any dtype, still
    on the 0-255 scale. The result is channels-first float32, batched iff the
    input was, on the input tensor's device (CPU for numpy input).
    """
    norm = as_input_norm(norm)
    x, batched = _as_channels_first(image)
    if norm.bgr:
        x = x.flip(1)
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x * norm.scale - mean) / std
    x = x.contiguous()
    return x if batched else x[0]


def denormalize(x: torch.Tensor, norm: NormLike) -> torch.Tensor:
    """The inverse of `normalize` for display: uint8 RGB, channels first, same batching."""
    norm = as_input_norm(norm)
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"tensor of shape {tuple(x.shape)}: expected 3 x H x W or N x 3 x H x W")
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    pixels = (x.float() * std + mean) / norm.scale
    if norm.bgr:
        pixels = pixels.flip(-3)
    return pixels.round().clamp(0, 255).to(torch.uint8)
