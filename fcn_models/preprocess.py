"""Input normalisation: what the pixels must look like for a given set of weights.

Weights converted from Caffe expect BGR channels on the 0-255 scale with the
ImageNet mean subtracted; torchvision's expect RGB scaled to 0-1, then
standardised with the ImageNet mean and std. The weights' own metadata (an
InputNorm) says which; the FCN carries it as `model.input_norm` and checkpoints
store it, so one function, `normalize`, serves every model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Union

import numpy as np
import torch


@dataclass(frozen=True)
class InputNorm:
    """How raw RGB pixel values (0-255) become network input.

    network input = (pixels[channel order] * scale - mean) / std, with the
    channels reversed first when `bgr`; mean and std are in the network's order.
    """
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool
    scale: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "InputNorm":
        expected = {"name", "mean", "std", "bgr", "scale"}
        if not isinstance(data, dict) or set(data) != expected:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"an input normalisation needs exactly the keys {sorted(expected)}, got {got}")
        mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"input normalisation {data['name']!r}: mean and std need 3 values each, std > 0")
        return cls(str(data["name"]), mean, std, bool(data["bgr"]), float(data["scale"]))


# Caffe's VGG16/FCN weights: BGR, 0-255, the reference's per-channel mean.
CAFFE_BGR = InputNorm("caffe-bgr", (104.00699, 116.66877, 122.67892), (1.0, 1.0, 1.0), True, 1.0)
# torchvision ImageNet weights (VGG16, AlexNet).
TORCHVISION_RGB = InputNorm("torchvision-rgb", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False, 1 / 255)
# torchvision's GoogLeNet weights were ported with their own normalisation: its
# `transform_input` turns ImageNet-standardised input into (x - 0.5) / 0.5, so that is what they expect.
TORCHVISION_GOOGLENET = InputNorm("torchvision-rgb-googlenet", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False, 1 / 255)

PRESETS = {n.name: n for n in (CAFFE_BGR, TORCHVISION_RGB, TORCHVISION_GOOGLENET)}

NormLike = Union[InputNorm, str, dict]


def as_input_norm(norm: NormLike) -> InputNorm:
    """An InputNorm from itself, a preset name or its dict form."""
    if isinstance(norm, InputNorm):
        return norm
    if isinstance(norm, str):
        if norm not in PRESETS:
            raise ValueError(f"unknown input normalisation {norm!r}; known: {', '.join(PRESETS)}")
        return PRESETS[norm]
    return InputNorm.from_dict(norm)


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
