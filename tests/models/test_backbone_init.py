"""Training from scratch: a freshly built trunk passes the input's signal through to fc7.

Under PyTorch's default convolution init the activations shrink at every layer of
VGG16 and the biases take over: fc7's output is then the same for any input (its
relative change between two inputs is ~1e-5), and FCN-32s learns only background.
"""
import pytest
import torch
import torch.nn as nn

from fcn_models import build_fcn


def _rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


def _fc7_response(model: nn.Module, first: str, last: str) -> tuple[float, float, float]:
    """RMS of the first ReLU's output, RMS at fc7, and how much fc7 differs between two inputs."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.eval().extract(x, (first, last))
    fc7 = out[last]
    return _rms(out[first]), _rms(fc7), _rms(fc7[0] - fc7[1]) / _rms(fc7)


@pytest.mark.parametrize("width", [1 / 8, 1 / 4])
def test_vgg16_fc7_keeps_the_input_signal(width):
    torch.manual_seed(0)
    model = build_fcn("fcn32s", "vgg16", width=width)
    first, fc7, change = _fc7_response(model, "relu1_1", "relu7")
    # Fifteen layers on, the scale is within a small factor of the first layer's...
    assert fc7 > 0.2 * first
    # ...and it depends on the input, not only on the biases.
    assert change > 0.05


def test_trunk_convolutions_are_kaiming_fan_out_with_zero_bias():
    torch.manual_seed(0)
    trunk = build_fcn("fcn32s", "vgg16", width=0.25).trunk
    for name in ("conv1_1", "conv3_2", "fc6", "fc7"):
        conv = trunk.get_submodule(name)
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        expected_std = (2.0 / fan_out) ** 0.5
        assert abs(float(conv.weight.detach().std()) / expected_std - 1) < 0.1, name
        assert torch.count_nonzero(conv.bias) == 0, name


def test_default_init_would_lose_the_signal():
    """The contrast the init fixes: the same net with PyTorch's default init."""
    torch.manual_seed(0)
    model = build_fcn("fcn32s", "vgg16", width=1 / 8)
    for module in model.trunk.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
    _, _, change = _fc7_response(model, "relu1_1", "relu7")
    assert change < 1e-3
