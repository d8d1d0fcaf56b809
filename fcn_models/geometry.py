"""Receptive field, stride and crop-offset algebra, read off the layers themselves.

Every spatial layer maps an index y of its output to the coordinate x of the
centre of the input window it looks at, by an affine map x = stride * y + offset:

    convolution / pooling (kernel k, stride s, padding p, dilation d):
        x = s * y + ((d * (k - 1) + 1) - 1) / 2 - p
    transposed convolution (the inverse direction):
        x = (y + p - ((d * (k - 1) + 1) - 1) / 2) / s

Composing these maps along a path gives, for any tensor of the network, where
its pixels sit in the input image (this is what the Caffe reference's coord_map
does). Two tensors at the same stride are aligned by a crop whose offset is the
difference of their offsets in units of that stride; it must be a whole number,
and it is computed here, never typed in.

The receptive field is carried along with the map: a layer that sees k inputs
(dilated) grows the field by (k - 1) times the stride at its input. Blocks with
parallel branches (GoogLeNet's inception) take the largest branch; all branches
must agree on the coordinate map, or their outputs could not be concatenated.
Strides and offsets are exact fractions, so half-pixel offsets stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

import torch.nn as nn

# Layers that keep every coordinate where it is.
PASS_THROUGH = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.BatchNorm2d, nn.LocalResponseNorm, nn.GroupNorm,
)


@dataclass(frozen=True)
class Geometry:
    """Where the output of a layer (or a chain of layers) sits in its input.

    Output index y covers input coordinates centred at stride * y + offset;
    `field` is how many input positions one output depends on (the receptive
    field along one axis); `depth` counts the convolutions on the longest path.
    """
    stride: Fraction = Fraction(1)
    offset: Fraction = Fraction(0)
    field: Fraction = Fraction(1)
    depth: int = 0

    def then(self, inner: "Geometry") -> "Geometry":
        """The geometry of this chain followed by `inner`."""
        return Geometry(
            stride=self.stride * inner.stride,
            offset=self.offset + self.stride * inner.offset,
            field=self.field + (inner.field - 1) * self.stride,
            depth=self.depth + inner.depth,
        )

    @property
    def receptive_field(self) -> int:
        if self.field.denominator != 1:
            raise ValueError(f"receptive field {self.field} is not a whole number of pixels")
        return int(self.field)


IDENTITY = Geometry()


def _square(module: nn.Module, attr: str) -> int:
    """One number for a 2-D hyper-parameter; the algebra is per axis and our nets are square."""
    value = getattr(module, attr)
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(
                f"{type(module).__name__} has {attr}={tuple(value)}: the geometry code handles "
                "square kernels, strides, paddings and dilations only"
            )
        value = value[0]
    if isinstance(value, str):
        raise ValueError(f"{type(module).__name__} has {attr}={value!r}: give explicit numbers")
    return int(value)


def _window_layer(module: nn.Module) -> Geometry:
    k = _square(module, "kernel_size")
    s = _square(module, "stride") if module.stride is not None else k
    p = _square(module, "padding")
    d = _square(module, "dilation") if hasattr(module, "dilation") else 1
    extent = d * (k - 1) + 1
    depth = 1 if isinstance(module, nn.Conv2d) else 0
    return Geometry(Fraction(s), Fraction(extent - 1, 2) - p, Fraction(extent), depth)


def _transposed_layer(module: nn.ConvTranspose2d) -> Geometry:
    k, s = _square(module, "kernel_size"), _square(module, "stride")
    p, d = _square(module, "padding"), _square(module, "dilation")
    extent = d * (k - 1) + 1
    # One output depends on about extent/s inputs; only used if someone asks.
    return Geometry(Fraction(1, s), (p - Fraction(extent - 1, 2)) / s, Fraction(-(-extent // s)), 1)


def _parallel(branches: Iterable[nn.Module], name: str) -> Geometry:
    geometries = [layer_geometry(b) for b in branches]
    first = geometries[0]
    for g in geometries[1:]:
        if (g.stride, g.offset) != (first.stride, first.offset):
            raise ValueError(
                f"the branches of {name} are misaligned (stride/offset {first.stride}/{first.offset} "
                f"vs {g.stride}/{g.offset}): their outputs cannot be concatenated pixel for pixel"
            )
    return Geometry(first.stride, first.offset,
                    max(g.field for g in geometries), max(g.depth for g in geometries))


def layer_geometry(module: nn.Module) -> Geometry:
    """The geometry of one module, read from its kernel_size/stride/padding/dilation."""
    if isinstance(module, nn.ConvTranspose2d):
        return _transposed_layer(module)
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return _window_layer(module)
    if isinstance(module, PASS_THROUGH):
        return IDENTITY
    if isinstance(module, nn.Sequential):
        return chain_geometry(module)
    # torchvision's GoogLeNet blocks: imported here so that `import fcn_models` stays light.
    from torchvision.models.googlenet import BasicConv2d, Inception
    if isinstance(module, BasicConv2d):
        return chain_geometry([module.conv, module.bn])
    if isinstance(module, Inception):
        return _parallel([module.branch1, module.branch2, module.branch3, module.branch4],
                         type(module).__name__)
    raise TypeError(
        f"no geometry known for {type(module).__name__}: add it to fcn_models.geometry.layer_geometry "
        "(adaptive pooling has no fixed geometry and cannot be part of a fully convolutional net)"
    )


def chain_geometry(modules: Iterable[nn.Module]) -> Geometry:
    """The geometry of modules applied one after another."""
    g = IDENTITY
    for m in modules:
        g = g.then(layer_geometry(m))
    return g


def crop_offset(tensor: Geometry, reference: Geometry, what: str = "tensor") -> int:
    """How many pixels to drop at the top/left of `tensor` so it lines up with `reference`.

    Both geometries are measured in the same (input image) coordinates. The
    offset must be a non-negative whole number: anything else means the layers
    cannot be aligned by cropping, and the network definition is wrong.
    """
    if tensor.stride != reference.stride:
        raise ValueError(f"cannot crop {what}: stride {tensor.stride} differs from the reference's {reference.stride}")
    offset = (reference.offset - tensor.offset) / tensor.stride
    if offset.denominator != 1 or offset < 0:
        raise ValueError(
            f"cannot crop {what}: its pixels sit {offset} reference pixels from the reference's; "
            "a crop needs a non-negative whole number (check the layers' kernel/stride/padding)"
        )
    return int(offset)
