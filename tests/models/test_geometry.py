"""Crop offsets, receptive fields and strides come out of the layers' own geometry."""
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

from fcn_models import build_fcn, build_trunk
from fcn_models.geometry import IDENTITY, chain_geometry, crop_offset, layer_geometry
from fcn_models.surgery import upsampling

NARROW = 1 / 32  # same layers, 2-128 channels: fast


@pytest.mark.parametrize("variant, expected", [
    ("fcn32s", {"score": 19}),
    ("fcn16s", {"score_pool4": 5, "score": 27}),
    ("fcn8s", {"score_pool4": 5, "score_pool3": 9, "score": 31}),
    ("fcn8s-atonce", {"score_pool4": 5, "score_pool3": 9, "score": 31}),
])
def test_vgg16_crop_offsets_equal_the_reference(variant, expected):
    assert build_fcn(variant, "vgg16", width=NARROW).crop_offsets() == expected


def test_alexnet_crop_offset_equals_the_reference():
    assert build_fcn("fcn32s", "alexnet", width=NARROW).crop_offsets() == {"score": 18}


def test_caffe_alexnet_layer_geometry_gives_crop_18():
    # The Caffe reference's AlexNet, written out layer by layer (channels do not matter).
    layers = [
        nn.Conv2d(3, 1, 11, stride=4, padding=100), nn.ReLU(), nn.LocalResponseNorm(5),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(1, 1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(1, 1, 6), nn.Dropout(), nn.Conv2d(1, 1, 1), nn.Conv2d(1, 21, 1),
        nn.ConvTranspose2d(21, 21, 63, stride=32, bias=False),
    ]
    g = chain_geometry(layers)
    assert g.stride == 1
    assert crop_offset(g, IDENTITY) == 18


def test_changing_a_layer_changes_the_crop():
    model = build_fcn("fcn32s", "vgg16", width=NARROW).eval()
    model.trunk.conv1_1.padding = (101, 101)  # the image moves one pixel further into the score map
    assert model.crop_offsets() == {"score": 20}
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 37, 20)).shape[-2:] == (37, 20)


def test_receptive_fields_and_strides_of_the_trunks():
    vgg = build_trunk("vgg16", NARROW)
    assert chain_geometry(vgg.layers_until("pool5")).receptive_field == 212
    g = chain_geometry(vgg.layers_until("fc7"))
    assert (g.receptive_field, g.stride) == (212 + (7 - 1) * 32, 32)
    alex = chain_geometry(build_trunk("alexnet", NARROW).layers_until("drop7"))
    assert (alex.receptive_field, alex.stride) == (355, 32)
    goog = build_trunk("googlenet", NARROW)
    fcn_part = chain_geometry(goog.layers_until("inception5b"))
    assert (fcn_part.receptive_field, fcn_part.stride) == (715, 32)
    with_pool = chain_geometry([*goog.layers_until("inception5b"), *goog.classifier_tail])
    assert with_pool.receptive_field == 715 + (7 - 1) * 32 == 907


def test_torchvision_googlenet_geometry_would_give_571():
    # torchvision's 3x3 "5x5" branch and 2x2 pool4, put back, shrink the paper's 907 to 571.
    from torchvision.models.googlenet import BasicConv2d
    trunk = build_trunk("googlenet", NARROW)
    for name, block in trunk.named_children():
        if name.startswith("inception"):
            conv = block.branch3[1].conv
            block.branch3[1] = BasicConv2d(conv.in_channels, conv.out_channels, kernel_size=3, padding=1)
    trunk.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
    g = chain_geometry([*trunk.layers_until("inception5b"), *trunk.classifier_tail])
    assert g.receptive_field == 571


def test_layer_maps_follow_kernel_stride_padding_dilation():
    g = layer_geometry(nn.Conv2d(1, 1, 3, stride=2, padding=1, dilation=2))
    # extent 5: output y looks at inputs centred on 2y + 2 - 1
    assert (g.stride, g.offset, g.field, g.depth) == (2, 1, 5, 1)
    up = layer_geometry(nn.ConvTranspose2d(1, 1, 4, stride=2, bias=False))
    assert (up.stride, up.offset) == (Fraction(1, 2), Fraction(-3, 4))
    # down then the matching up returns to the same coordinates
    down = layer_geometry(nn.MaxPool2d(2, 2))
    assert down.then(up).stride == 1 and down.then(up).offset == Fraction(1, 2) - Fraction(3, 2)


def test_crop_offset_refuses_misalignment():
    half = chain_geometry([nn.MaxPool2d(2, 2)])           # centres at 2y + 0.5
    whole = chain_geometry([nn.MaxPool2d(3, 2, padding=1)])  # centres at 2y
    with pytest.raises(ValueError, match="whole number"):
        crop_offset(half, whole, "half")
    with pytest.raises(ValueError, match="stride"):
        crop_offset(half, IDENTITY, "half")


def test_unknown_and_adaptive_layers_are_refused():
    with pytest.raises(TypeError, match="AdaptiveAvgPool2d"):
        layer_geometry(nn.AdaptiveAvgPool2d(1))


def test_misaligned_parallel_branches_are_refused():
    from torchvision.models.googlenet import Inception
    block = Inception(8, 2, 2, 2, 2, 2, 2)
    block.branch2[1].conv.padding = (0, 0)
    with pytest.raises(ValueError, match="misaligned"):
        layer_geometry(block)


def test_upsampling_kernels_are_derived_like_the_reference():
    def kernels(variant, backbone):
        model = build_fcn(variant, backbone, width=NARROW)
        return [(m.kernel_size[0], m.stride[0]) for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert kernels("fcn32s", "vgg16") == [(64, 32)]
    assert kernels("fcn16s", "vgg16") == [(4, 2), (32, 16)]
    assert kernels("fcn8s", "vgg16") == [(4, 2), (4, 2), (16, 8)]
    assert kernels("fcn32s", "alexnet") == [(63, 32)]
    # upsampled pixels must land on whole pixels: odd kernels where the trunk's centres are whole
    assert upsampling(1, 63, 32).weight.shape == (1, 1, 63, 63)
