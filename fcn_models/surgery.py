"""Net surgery: bilinear upsampling, ImageNet weights into the convolutionalised trunk,
and stage-to-stage weight transfer (FCN-32s -> 16s -> 8s) by layer name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn as nn

from .norms import NormLike, as_input_norm
from .weights import read_state_dict


# ---------------------------------------------------------------- upsampling

def bilinear_kernel(kernel_size: int) -> torch.Tensor:
    """The reference's 2-D bilinear interpolation kernel (kernel_size x kernel_size, float32)."""
    if kernel_size < 1:
        raise ValueError(f"kernel size must be >= 1, got {kernel_size}")
    factor = (kernel_size + 1) // 2
    centre = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    r = torch.arange(kernel_size, dtype=torch.float64)
    line = 1 - (r - centre).abs() / factor
    return torch.outer(line, line).to(torch.float32)


def bilinear_weight(channels: int, kernel_size: int) -> torch.Tensor:
    """A transposed-convolution weight (channels, channels, k, k) upsampling each channel on its own."""
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = bilinear_kernel(kernel_size)
    return weight


def freeze(module: nn.Module) -> nn.Module:
    """No optimizer can move these parameters: they take no gradient at all."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def upsampling(channels: int, kernel_size: int, stride: int) -> nn.ConvTranspose2d:
    """A fixed bilinear upsampling layer, as in the reference (no bias, frozen)."""
    layer = nn.ConvTranspose2d(channels, channels, kernel_size, stride=stride, bias=False)
    if not layer.weight.is_meta:  # a shape-only (meta) build has no values to fill
        with torch.no_grad():
            layer.weight.copy_(bilinear_weight(channels, kernel_size))
    return freeze(layer)


# ---------------------------------------------------------------- ImageNet weights

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

# Where torchvision keeps each backbone's ImageNet weights (used only when asked for "torchvision").
TORCHVISION_WEIGHTS = {
    "vgg16": "VGG16_Weights",
    "alexnet": "AlexNet_Weights",
    "googlenet": "GoogLeNet_Weights",
}


def _read_state_dict(source: Source, backbone: str) -> tuple[dict, str]:
    """(state dict, a name for it in messages)."""
    if isinstance(source, Mapping):
        return dict(source), "the given state dict"
    if isinstance(source, str) and source == "torchvision":
        import torchvision.models as tvm  # needs network on first use; never called by tests
        weights = getattr(tvm, TORCHVISION_WEIGHTS[backbone]).IMAGENET1K_V1
        return weights.get_state_dict(progress=True), f"torchvision {weights}"
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet weights file {path} not found: give the path of a torchvision {backbone} "
            "state dict (torch.save(model.state_dict(), path)), or 'torchvision' to download them"
        )
    return read_state_dict(path), path


def _fit(ours: torch.Tensor, theirs: torch.Tensor, key: str, origin: str, may_centre: bool,
         trunk: str = "", width: Optional[float] = None) -> torch.Tensor:
    """Their tensor in our shape: as is, a fully connected layer reshaped into a convolution,
    or (where the trunk allows it) a smaller odd kernel centred in a larger one, which computes
    the same function (torchvision GoogLeNet's 3x3 "5x5" branch)."""
    if theirs.shape == ours.shape:
        return theirs
    if theirs.ndim == 2 and ours.ndim == 4 and theirs.numel() == ours.numel() and theirs.shape[0] == ours.shape[0]:
        return theirs.reshape(ours.shape)
    if (may_centre and theirs.ndim == ours.ndim == 4 and theirs.shape[:2] == ours.shape[:2]
            and theirs.shape[2] == theirs.shape[3] and ours.shape[2] == ours.shape[3]
            and theirs.shape[2] % 2 == ours.shape[2] % 2 == 1 and theirs.shape[2] < ours.shape[2]):
        pad = (ours.shape[2] - theirs.shape[2]) // 2
        return torch.nn.functional.pad(theirs, (pad, pad, pad, pad))
    model = f"the width-{width:g} {trunk} trunk" if width is not None else f"the {trunk} trunk"
    theirs_width = ""
    if width is not None and theirs.ndim >= 1 and ours.ndim >= 1 and ours.shape[0]:
        theirs_width = f" (a width-{theirs.shape[0] * width / ours.shape[0]:.3g} {trunk}'s, by its output channels)"
    raise ValueError(
        f"{origin}: {key} has shape {tuple(theirs.shape)}{theirs_width}, but {model} needs {tuple(ours.shape)}: "
        "ImageNet weights load into a trunk of any width whose shapes match theirs; "
        "set model.width to the width they were trained at"
    )


def load_imagenet_weights(model: nn.Module, source: Source, norm: Optional[NormLike] = None) -> list[str]:
    """Load a torchvision-format ImageNet classifier into the FCN's trunk.

    source: a path to a saved state dict, a state dict, or "torchvision" to use
    torchvision's weights API (downloads; needs the network). Convolutions map
    by name (vgg16: features.N -> conv names; classifier.0 -> fc6 reshaped to
    4096x512x7x7, classifier.3 -> fc7; alexnet: classifier.1 -> fc6 4096x256x6x6,
    classifier.4 -> fc7; googlenet: same layer names). The ImageNet scores
    (classifier.6 / fc, GoogLeNet's auxiliary heads) are dropped. The model's
    input_norm becomes `norm`, by default the one these weights expect
    (give CAFFE_BGR for Caffe-converted weights). Returns the names loaded.
    """
    trunk = getattr(model, "trunk", model)
    if not trunk.torchvision_names:
        raise ValueError(
            f"the {trunk.name} trunk has no torchvision ImageNet classifier to take weights from; "
            "import the reference's Caffe model with `fcn import` instead"
        )
    state, origin = _read_state_dict(source, trunk.name)
    loaded, used = [], set()
    with torch.no_grad():
        for layer, prefix in trunk.torchvision_names.items():
            for suffix, ours in trunk.get_submodule(layer).state_dict(keep_vars=True).items():
                key = f"{prefix}.{suffix}"
                if key not in state:
                    raise KeyError(f"{origin}: missing {key} (for {layer}.{suffix}); is it a torchvision {trunk.name}?")
                may_centre = key.endswith(trunk.torchvision_smaller_kernels) if trunk.torchvision_smaller_kernels else False
                ours.copy_(_fit(ours, state[key], key, origin, may_centre, trunk.name, getattr(model, "width", None)))
                used.add(key)
                loaded.append(f"trunk.{layer}.{suffix}")
    unexpected = [k for k in state if k not in used and not k.startswith(tuple(p + "." for p in trunk.torchvision_dropped))]
    if unexpected:
        raise ValueError(f"{origin}: keys that are not part of a torchvision {trunk.name}: {unexpected[:5]}")
    if hasattr(model, "input_norm"):
        model.input_norm = as_input_norm(norm) if norm is not None else trunk.imagenet_norm
    return loaded


# ---------------------------------------------------------------- stage transfer

@dataclass
class TransferReport:
    copied: list[str] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)  # in the destination, not in the source
    unused: list[str] = field(default_factory=list)        # in the source, not in the destination

    def __str__(self) -> str:
        lines = [f"copied {len(self.copied)} tensors"]
        lines.append("left at init: " + (", ".join(self.left_at_init) or "none"))
        if self.unused:
            lines.append("not in the destination: " + ", ".join(self.unused))
        return "\n".join(lines)


def transfer_weights(src: Union[nn.Module, Mapping[str, torch.Tensor]], dst: nn.Module,
                     log: Optional[Callable[[str], None]] = None) -> TransferReport:
    """Copy every parameter and buffer of the same name and shape from src into dst.

    This is the reference's staging (32s -> 16s -> 8s): the trunk and score_fr
    carry over, the new skip layers keep their zero init, so the new net starts
    out computing what the old one did. A same-name tensor of another shape is
    an error. The input normalisation comes along when src is a model.
    """
    source = src.state_dict() if isinstance(src, nn.Module) else dict(src)
    target = dst.state_dict(keep_vars=True)
    report = TransferReport()
    for name, tensor in target.items():
        if name not in source:
            report.left_at_init.append(name)
            continue
        if source[name].shape != tensor.shape:
            raise ValueError(
                f"cannot transfer {name}: source shape {tuple(source[name].shape)}, "
                f"destination shape {tuple(tensor.shape)} (same backbone, width and classes needed)"
            )
    for name, tensor in target.items():
        if name in source:
            with torch.no_grad():
                tensor.copy_(source[name])
            report.copied.append(name)
    report.unused = [n for n in source if n not in target]
    if isinstance(src, nn.Module) and hasattr(src, "input_norm") and hasattr(dst, "input_norm"):
        dst.input_norm = src.input_norm
    if log is not None:
        log(str(report))
    return report
