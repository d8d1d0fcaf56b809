"""One FCN module: a trunk, score layers and skip fusion. The variant is which taps it fuses.

    fcn32s        score_fr -> upscore (x32)
    fcn16s        score_fr -> upscore2 (x2) + score_pool4 -> upscore16 (x16)
    fcn8s         score_fr -> upscore2 (x2) + score_pool4 -> upscore_pool4 (x2) + score_pool3 -> upscore8 (x8)
    fcn8s-atonce  fcn8s, with pool4 scaled by 0.01 and pool3 by 0.0001 before their score layers

(names for VGG16; a skip layer is named after its tap, e.g. score_pool2 on AlexNet).
Score layers start at zero; upsampling is a frozen bilinear transposed
convolution. Each upsampling kernel is 2 x factor or 2 x factor - 1, whichever
puts the upsampled pixels on whole-pixel positions of what they are fused with
(VGG16: 64, 4, 32, 4, 16 and AlexNet: 63, as in the reference; AlexNet's and
GoogLeNet's odd-centred trunks get 63, 3, 31, 3, 15). Every crop offset
comes from fcn_models.geometry applied to the modules as they are when
forward runs, so changing a layer changes the crops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .backbones import BACKBONES, Trunk, build_trunk
from .geometry import IDENTITY, Geometry, crop_offset, layer_geometry
from .norms import InputNorm, NormLike, as_input_norm
from .surgery import upsampling
from .voc import NUM_CLASSES

VARIANTS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce")
# The trunk strides each variant fuses, coarse to fine.
FUSED_STRIDES = {"fcn32s": (), "fcn16s": (16,), "fcn8s": (16, 8), "fcn8s-atonce": (16, 8)}
# At-once training scales the skip features so that their scores start small next to the coarse ones.
ATONCE_SCALES = {16: 0.01, 8: 0.0001}


def _score_layer(in_channels: int, num_classes: int) -> nn.Conv2d:
    layer = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class FCN(nn.Module):
    """Fully convolutional network: (N, 3, H, W) input -> (N, num_classes, H, W) class scores."""

    def __init__(self, trunk: Trunk, variant: str = "fcn32s", num_classes: int = NUM_CLASSES,
                 width: float = 1.0, input_norm: Optional[NormLike] = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        missing = [s for s in FUSED_STRIDES[variant] if s not in trunk.taps]
        if missing:
            possible = [v for v in VARIANTS if all(s in trunk.taps for s in FUSED_STRIDES[v])]
            raise ValueError(
                f"{variant} needs a stride-{missing[0]} tap, which the {trunk.name} trunk does not have; "
                f"it supports {', '.join(possible)}"
            )
        self.variant = variant
        self.backbone_name = trunk.name
        self.width = float(width)
        self.num_classes = num_classes
        self.input_norm: InputNorm = as_input_norm(input_norm) if input_norm is not None else trunk.imagenet_norm
        self.trunk = trunk
        self.score_fr = _score_layer(trunk.tap_channels[32], num_classes)

        # (upsampling layer, factor, tap stride it is fused with or None for the last step)
        strides = FUSED_STRIDES[variant]
        if not strides:
            plan = [("upscore", 32, None)]
        elif len(strides) == 1:
            plan = [("upscore2", 2, 16), ("upscore16", 16, None)]
        else:
            plan = [("upscore2", 2, 16), (f"upscore_{trunk.taps[16]}", 2, 8), ("upscore8", 8, None)]
        self.fuse_steps = []  # (tap stride, tap layer, score layer, upsampling layer)
        self.final_upsampling = plan[-1][0]
        self.tap_scales = {s: ATONCE_SCALES[s] for s in strides} if variant == "fcn8s-atonce" else {}

        prefix = self._trunk_geometries()
        g = prefix[trunk.score_source].then(layer_geometry(self.score_fr))
        for up_name, factor, tap_stride in plan:
            if tap_stride is None:
                reference, score_name = None, "score"
            else:
                tap = trunk.taps[tap_stride]
                score_name = f"score_{tap}"
                setattr(self, score_name, _score_layer(trunk.tap_channels[tap_stride], num_classes))
                reference = prefix[tap].then(layer_geometry(getattr(self, score_name)))
                self.fuse_steps.append((tap_stride, tap, score_name, up_name))
            up, g = self._aligned_upsampling(g, factor, reference, score_name)
            setattr(self, up_name, up)
        self.crop_offsets()  # fails now, not at the first batch, if anything is misaligned

    def _aligned_upsampling(self, g: Geometry, factor: int, reference: Optional[Geometry], what: str):
        """The bilinear upsampling of `factor` whose output lands on whole pixels of what it meets next."""
        for kernel in (2 * factor, 2 * factor - 1):
            layer = upsampling(self.num_classes, kernel, factor)
            up = g.then(layer_geometry(layer))
            try:
                if reference is None:
                    crop_offset(up, IDENTITY, what)
                else:
                    crop_offset(reference, up, what)
            except ValueError:
                continue
            return layer, up
        raise ValueError(f"no bilinear kernel for x{factor} upsampling aligns {what} on the {self.backbone_name} trunk")

    def _trunk_geometries(self) -> dict[str, Geometry]:
        """Each trunk layer's output geometry in input-image coordinates."""
        g, out = IDENTITY, {}
        for name, layer in self.trunk.named_children():
            g = g.then(layer_geometry(layer))
            out[name] = g
        return out

    def crop_offsets(self) -> dict[str, int]:
        """Crop offsets, read from the layers as they are now: each skip score map's
        offset against the upsampled map it is added to, and "score": the final
        map's offset against the input image."""
        prefix = self._trunk_geometries()
        g = prefix[self.trunk.score_source].then(layer_geometry(self.score_fr))
        offsets = {}
        for _, tap, score_name, up_name in self.fuse_steps:
            g = g.then(layer_geometry(getattr(self, up_name)))
            reference = prefix[tap].then(layer_geometry(getattr(self, score_name)))
            offsets[score_name] = crop_offset(reference, g, score_name)
        g = g.then(layer_geometry(getattr(self, self.final_upsampling)))
        offsets["score"] = crop_offset(g, IDENTITY, "score")
        return offsets

    def receptive_field(self) -> int:
        """Receptive field of the score source, in input pixels."""
        return self._trunk_geometries()[self.trunk.score_source].receptive_field

    def extract(self, x: torch.Tensor, names) -> dict[str, torch.Tensor]:
        """Outputs of the named trunk layers (e.g. ("pool5", "relu7")) for input x."""
        return self.trunk(x, keep=tuple(names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FCN input must be N x 3 x H x W, got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        offsets = self.crop_offsets()
        taps = self.trunk(x, keep=(self.trunk.score_source, *(tap for _, tap, _, _ in self.fuse_steps)))
        score = self.score_fr(taps[self.trunk.score_source])
        for stride, tap, score_name, up_name in self.fuse_steps:
            up = getattr(self, up_name)(score)
            features = taps[tap] * self.tap_scales[stride] if stride in self.tap_scales else taps[tap]
            skip = getattr(self, score_name)(features)
            score = _fuse(up, skip, offsets[score_name], score_name)
        out = getattr(self, self.final_upsampling)(score)
        return _crop(out, offsets["score"], height, width)


def _fuse(up: torch.Tensor, skip: torch.Tensor, offset: int, what: str) -> torch.Tensor:
    """up + skip[offset:], over the pixels both cover.

    The reference crops the skip map to the upsampled one; where a trunk has no
    fc6-like shrink (GoogLeNet) the upsampled map can reach one pixel past the
    skip's end, and that pixel is dropped too (it lies far outside the image).
    """
    # Slices past the end stop at it: the same as min(up, skip - offset), written so that a
    # traced export (ONNX) keeps it a function of the input size rather than one branch.
    cut = skip[..., offset:offset + up.shape[-2], offset:offset + up.shape[-1]]
    if cut.shape[-2] <= 0 or cut.shape[-1] <= 0:
        raise RuntimeError(f"{what} ({tuple(skip.shape[-2:])}) does not overlap the upsampled scores at offset {offset}")
    return up[..., :cut.shape[-2], :cut.shape[-1]] + cut


def _crop(out: torch.Tensor, offset: int, height: int, width: int) -> torch.Tensor:
    if out.shape[-2] < offset + height or out.shape[-1] < offset + width:
        raise RuntimeError(
            f"upsampled scores {tuple(out.shape[-2:])} at offset {offset} do not cover the {height}x{width} input; "
            "the first convolution's padding is too small for this trunk"
        )
    return out[..., offset:offset + height, offset:offset + width]


def build_fcn(variant: str = "fcn32s", backbone: str = "vgg16", num_classes: int = NUM_CLASSES,
              width: float = 1.0, input_norm: Optional[NormLike] = None) -> FCN:
    """An FCN with a freshly initialised trunk (load ImageNet weights with surgery.load_imagenet_weights)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return FCN(build_trunk(backbone, width), variant, num_classes, width, input_norm)


def reference_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The reference's optimizer groups: weights at lr with decay, biases at 2 x lr without.
    Frozen parameters (the upsampling) are left out; they take no gradient anyway."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith("bias") else weights).append(p)
    return [{"params": weights, "lr": lr, "weight_decay": weight_decay},
            {"params": biases, "lr": 2 * lr, "weight_decay": 0.0}]


class CompiledForInference(nn.Module):
    """An FCN compiled by torch.compile with its weights frozen into the graph.

    Freezing lets the compiler pre-pack the convolution weights and fuse each
    convolution with its ReLU (oneDNN on CPU), which plain eager mode cannot do.
    The first call for an input size compiles (tens of seconds for VGG16);
    weights are read at compile time, so build a new one after changing them.
    Runs in inference mode; `.model` is the underlying FCN.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_compiled", torch.compile(model))  # not a submodule: no duplicate state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            return self._compiled(x)


def optimize_for_inference(model: nn.Module, compile: bool = False) -> nn.Module:
    """The model set up for fast prediction: eval mode, weights in channels-last layout (oneDNN on
    CPU and cuDNN pick faster convolutions), and with compile=True also compiled with frozen
    weights (CompiledForInference; fastest, after a one-off build). Run it under
    torch.inference_mode(); input may be in either memory layout."""
    model.eval()
    model = model.to(memory_format=torch.channels_last)
    return CompiledForInference(model) if compile else model


__all__ = ["FCN", "VARIANTS", "BACKBONES", "build_fcn", "optimize_for_inference", "CompiledForInference",
           "reference_param_groups"]
