"""Input normalisations: what the pixels must look like for a given set of weights.

Weights converted from Caffe expect BGR channels on the 0-255 scale with the
ImageNet mean subtracted; torchvision's expect RGB scaled to 0-1, then
standardised with the ImageNet mean and std. The weights' own metadata (an
InputNorm) says which; the FCN carries it as `model.input_norm` and checkpoints
store it. Plain data, no torch: the params checker and the data pipeline read
these names too. fcn_models.preprocess applies them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Union


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

# What each backbone's own ImageNet weights expect as input; fcn_models.backbones builds
# exactly these backbones (checked when it is imported).
BACKBONE_NORMS = {"vgg16": TORCHVISION_RGB, "alexnet": TORCHVISION_RGB, "googlenet": TORCHVISION_GOOGLENET,
                  "caffe-alexnet": CAFFE_BGR}

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
