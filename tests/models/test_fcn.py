"""The FCN module: output size and alignment, reference layer facts, variants, input normalisation."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from fcn_models import (
    BACKBONES,
    CAFFE_BGR,
    FCN,
    TORCHVISION_RGB,
    VARIANTS,
    InputNorm,
    build_fcn,
    build_trunk,
    normalize,
    optimize_for_inference,
    reference_param_groups,
)
from fcn_models.geometry import chain_geometry, layer_geometry
from fcn_models.preprocess import as_input_norm, denormalize
from fcn_models.surgery import bilinear_kernel

NARROW = 1 / 32
SIZES = [1, 2, 3, 17, 31, 32, 33, 64, 100, 223, 224, 257, 500]


def _randomise(model, seed=0):
    """Non-zero score layers (as after training) so outputs carry information."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_vgg16_output_matches_input_size_for_every_size(variant):
    model = build_fcn(variant, "vgg16", width=NARROW).eval()
    with torch.no_grad():
        for h in SIZES:
            w = SIZES[(SIZES.index(h) + 5) % len(SIZES)]  # odd/even and wide/tall mixes
            assert model(torch.zeros(1, 3, h, w)).shape == (1, 21, h, w)


@pytest.mark.parametrize("backbone", ["alexnet", "googlenet"])
@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s"])
def test_other_trunks_output_matches_input_size(backbone, variant):
    model = build_fcn(variant, backbone, num_classes=3, width=NARROW).eval()
    with torch.no_grad():
        for h, w in [(1, 1), (2, 3), (17, 32), (33, 31), (64, 100), (224, 223)]:
            assert model(torch.zeros(2, 3, h, w)).shape == (2, 3, h, w)


def _impulse_response_centre(model, layer_name, index, size):
    """Replace `layer_name`'s output by a one-pixel impulse at (index, index) and return the
    centre of mass, along rows and columns, of the network output it produces."""
    def impulse(module, inputs, out):
        spike = torch.zeros_like(out)
        spike[0, 0, index, index] = 1.0
        return spike
    handle = getattr(model, layer_name).register_forward_hook(impulse)
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, size, size))[0, 0].double()
    finally:
        handle.remove()
    assert out.sum() > 0
    rows, cols = torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64)
    return float((out.sum(1) * rows).sum() / out.sum()), float((out.sum(0) * cols).sum() / out.sum()), out


@pytest.mark.parametrize("backbone, variant", [
    ("vgg16", "fcn32s"), ("vgg16", "fcn16s"), ("vgg16", "fcn8s"), ("alexnet", "fcn32s"),
    ("alexnet", "fcn8s"), ("googlenet", "fcn16s"),
])
def test_coarse_score_impulse_lands_where_the_geometry_says(backbone, variant):
    model = build_fcn(variant, backbone, width=NARROW).eval()
    trunk = model.trunk
    g = chain_geometry([*trunk.layers_until(trunk.score_source), model.score_fr])
    index = 4
    predicted = float(g.stride * index + g.offset)  # image coordinate of score_fr[4, 4]
    row, col, out = _impulse_response_centre(model, "score_fr", index, 300)
    assert row == pytest.approx(predicted, abs=1e-6) and col == pytest.approx(predicted, abs=1e-6)
    # the response is symmetric about the predicted coordinate
    profile = out.sum(1)
    mirrored = [(r, int(2 * predicted) - r) for r in range(len(profile)) if 0 <= int(2 * predicted) - r < len(profile)]
    assert all(abs(profile[r] - profile[m]) < 1e-6 for r, m in mirrored)
    if variant == "fcn32s":
        # one bilinear kernel: the peak is the predicted pixel, or the two either side of a half-pixel centre
        peak_rows = set(torch.nonzero(out >= out.max() * (1 - 1e-5))[:, 0].tolist())
        assert peak_rows == {int(np.floor(predicted)), int(np.ceil(predicted))}


def test_skip_impulse_lands_where_the_geometry_says():
    model = build_fcn("fcn8s", "vgg16", width=NARROW).eval()
    for score_name, tap, index in [("score_pool4", "pool4", 9), ("score_pool3", "pool3", 17)]:
        g = chain_geometry(model.trunk.layers_until(tap)).then(layer_geometry(getattr(model, score_name)))
        predicted = float(g.stride * index + g.offset)
        row, col, _ = _impulse_response_centre(model, score_name, index, 200)
        assert (row, col) == (pytest.approx(predicted, abs=1e-6), pytest.approx(predicted, abs=1e-6))


@pytest.mark.parametrize("backbone, pixel", [("vgg16", 300), ("alexnet", 300), ("googlenet", 400)])
def test_input_pixel_reaches_exactly_the_score_units_whose_field_covers_it(backbone, pixel):
    # All-positive weights, zero biases, float64: an input impulse turns on exactly the
    # score units whose receptive field, as the geometry computes it, contains the pixel.
    model = build_fcn("fcn32s", backbone, width=NARROW).double().eval()
    with torch.no_grad():
        for m in model.trunk.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.reset_parameters(), m.reset_running_stats()
        x = torch.zeros(1, 3, 500, 500, dtype=torch.float64)
        x[0, :, pixel, pixel] = 1.0
        source = model.extract(x, [model.trunk.score_source])[model.trunk.score_source]
    g = chain_geometry(model.trunk.layers_until(model.trunk.score_source))
    on = torch.nonzero(source[0].sum((0, 2)) > 0)[:, 0].tolist()  # any channel, any column
    half = (g.receptive_field - 1) / 2
    expected = [j for j in range(source.shape[-2]) if abs(float(g.stride * j + g.offset) - pixel) <= half]
    assert on == expected
    assert 0 < len(on) < source.shape[-2]  # the field's edge falls inside the map: a real check


def test_reference_layer_facts_vgg16():
    model = build_fcn("fcn8s", "vgg16", width=1 / 8)
    t = model.trunk
    assert t.conv1_1.padding == (100, 100)
    assert all(m.ceil_mode for m in t.modules() if isinstance(m, nn.MaxPool2d))
    assert (t.fc6.kernel_size, t.fc6.padding, t.fc7.kernel_size) == ((7, 7), (0, 0), (1, 1))
    names = list(t._modules)
    assert names[names.index("fc6"):] == ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7"]
    assert t.drop6.p == t.drop7.p == 0.5
    assert [n for n in names if n.startswith("conv")] == [
        f"conv{b}_{i}" for b, n in [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)] for i in range(1, n + 1)]
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = getattr(model, name)
        assert layer.kernel_size == (1, 1) and layer.out_channels == 21
        assert layer.weight.abs().sum() == 0 and layer.bias.abs().sum() == 0


def test_variants_are_one_module_with_nested_layer_names():
    keys = {v: set(build_fcn(v, "vgg16", width=NARROW).state_dict()) for v in VARIANTS}
    assert all(type(build_fcn(v, "vgg16", width=NARROW)) is FCN for v in VARIANTS)
    head = {v: {k.split(".")[0] for k in keys[v] if not k.startswith("trunk.")} for v in VARIANTS}
    assert head["fcn32s"] == {"score_fr", "upscore"}
    assert head["fcn16s"] == {"score_fr", "upscore2", "score_pool4", "upscore16"}
    assert head["fcn8s"] == {"score_fr", "upscore2", "score_pool4", "upscore_pool4", "score_pool3", "upscore8"}
    assert keys["fcn8s-atonce"] == keys["fcn8s"]
    trunk_keys = {v: {k for k in keys[v] if k.startswith("trunk.")} for v in VARIANTS}
    assert len({frozenset(k) for k in trunk_keys.values()}) == 1


def test_upsampling_is_bilinear_per_class_and_frozen():
    model = build_fcn("fcn8s", "vgg16", num_classes=5, width=NARROW)
    ups = {n: m for n, m in model.named_children() if isinstance(m, nn.ConvTranspose2d)}
    assert set(ups) == {"upscore2", "upscore_pool4", "upscore8"}
    for m in ups.values():
        k = m.kernel_size[0]
        assert m.bias is None and not m.weight.requires_grad
        for i in range(5):
            for j in range(5):
                expected = bilinear_kernel(k) if i == j else torch.zeros(k, k)
                assert torch.equal(m.weight[i, j], expected)
    # even an optimizer handed every parameter cannot move them
    before = {n: m.weight.clone() for n, m in ups.items()}
    _randomise(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    model(torch.randn(1, 3, 40, 40)).square().sum().backward()
    opt.step()
    for n, m in ups.items():
        assert m.weight.grad is None and torch.equal(m.weight, before[n])


def test_bilinear_kernel_values():
    # factor 2, centre 1.5: 1 - |i - 1.5| / 2 along each axis
    line4 = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.allclose(bilinear_kernel(4), torch.outer(line4, line4))
    line3 = torch.tensor([0.5, 1.0, 0.5])  # odd: factor 2, centre 1
    assert torch.allclose(bilinear_kernel(3), torch.outer(line3, line3))
    # x32 bilinear upsampling keeps a constant map constant away from the borders
    from fcn_models.surgery import upsampling
    out = upsampling(1, 64, 32)(torch.ones(1, 1, 6, 6))
    assert torch.allclose(out[0, 0, 48:-48, 48:-48], torch.ones(1))


def test_atonce_scales_pool4_and_pool3_before_scoring():
    atonce = _randomise(build_fcn("fcn8s-atonce", "vgg16", width=NARROW)).eval()
    staged = build_fcn("fcn8s", "vgg16", width=NARROW).eval()
    staged.load_state_dict(atonce.state_dict())
    with torch.no_grad():
        staged.score_pool4.weight.mul_(0.01)
        staged.score_pool3.weight.mul_(0.0001)
        x = torch.randn(1, 3, 50, 61)
        a, s = atonce(x), staged(x)
    assert a.abs().max() > 0
    assert torch.allclose(a, s, atol=1e-6, rtol=1e-5)


def test_width_scales_every_channel_count():
    t = build_trunk("vgg16", 0.5)
    assert (t.conv1_1.out_channels, t.conv5_3.out_channels, t.fc6.out_channels) == (32, 256, 2048)
    tiny = build_trunk("alexnet", 0.0001)
    assert all(m.out_channels == 1 for m in tiny.modules() if isinstance(m, nn.Conv2d))
    g = build_trunk("googlenet", 0.5)
    assert g.inception5b.branch1.conv.out_channels == 192
    assert g.inception5b.branch3[1].conv.kernel_size == (5, 5)


def test_clear_errors_for_bad_choices():
    with pytest.raises(ValueError, match="fcn4s"):
        build_fcn("fcn4s")
    with pytest.raises(ValueError, match="resnet"):
        build_fcn(backbone="resnet")
    trunk = build_trunk("alexnet", NARROW)
    del trunk.taps[8]
    with pytest.raises(ValueError, match="stride-8 tap.*fcn32s, fcn16s"):
        FCN(trunk, "fcn8s")
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        build_fcn(width=NARROW)(torch.zeros(3, 32, 32))
    assert set(BACKBONES) == {"vgg16", "alexnet", "googlenet", "caffe-alexnet"}


def test_extract_returns_named_trunk_outputs_untouched_by_inplace_relu():
    model = build_fcn("fcn32s", "vgg16", width=NARROW).eval()
    _randomise(model)
    with torch.no_grad():
        out = model.extract(torch.randn(1, 3, 64, 64), ["fc7", "relu7"])
    assert (out["fc7"] < 0).any()  # pre-activation kept, not overwritten by relu7 in place
    assert torch.equal(out["relu7"], out["fc7"].clamp(min=0))


def test_reference_param_groups():
    model = build_fcn("fcn16s", "vgg16", width=NARROW)
    weights, biases = reference_param_groups(model, lr=1e-10, weight_decay=5e-4)
    assert biases["lr"] == 2e-10 and biases["weight_decay"] == 0 and weights["weight_decay"] == 5e-4
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(weights["params"]) + len(biases["params"]) == len(trainable)
    assert all(p.requires_grad for p in weights["params"])


# ---------------------------------------------------------------- input normalisation

def test_normalize_torchvision_rgb_numpy_and_tensor_agree():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4
    x = normalize(image, TORCHVISION_RGB)
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32
    expected_r = (image[..., 0] / 255.0 - 0.485) / 0.229
    assert np.allclose(x[0].numpy(), expected_r, atol=1e-6)
    from_tensor = normalize(torch.from_numpy(image).permute(2, 0, 1), "torchvision-rgb")
    assert torch.equal(x, from_tensor)


def test_normalize_caffe_bgr_batched():
    batch = np.random.default_rng(0).integers(0, 256, size=(2, 6, 7, 3), dtype=np.uint8)
    x = normalize(batch, CAFFE_BGR)
    assert x.shape == (2, 3, 6, 7)
    assert np.allclose(x[1, 0].numpy(), batch[1, ..., 2] - 104.00699, atol=1e-4)  # blue first
    assert np.allclose(x[1, 2].numpy(), batch[1, ..., 0] - 122.67892, atol=1e-4)  # red last


@pytest.mark.parametrize("norm", [CAFFE_BGR, TORCHVISION_RGB])
def test_denormalize_inverts_normalize(norm):
    image = torch.randint(0, 256, (3, 9, 8), dtype=torch.uint8)
    assert torch.equal(denormalize(normalize(image, norm), norm), image)


def test_input_norm_dict_round_trip_and_errors():
    assert InputNorm.from_dict(CAFFE_BGR.to_dict()) == CAFFE_BGR
    assert as_input_norm("caffe-bgr") is CAFFE_BGR
    with pytest.raises(ValueError, match="unknown input normalisation"):
        as_input_norm("bgr-ish")
    with pytest.raises(ValueError, match="keys"):
        InputNorm.from_dict({"name": "x"})
    with pytest.raises(ValueError, match="H x W x 3"):
        normalize(np.zeros((4, 4), dtype=np.uint8), CAFFE_BGR)
    with pytest.raises(TypeError, match="list"):
        normalize([[1, 2, 3]], CAFFE_BGR)


def test_model_carries_its_input_norm():
    assert build_fcn(width=NARROW).input_norm == TORCHVISION_RGB
    assert build_fcn(width=NARROW, input_norm="caffe-bgr").input_norm == CAFFE_BGR
    assert build_fcn(backbone="googlenet", width=NARROW).input_norm.name == "torchvision-rgb-googlenet"


def test_optimize_for_inference_keeps_the_outputs():
    model = _randomise(build_fcn("fcn16s", "vgg16", width=NARROW)).eval()
    x = torch.randn(1, 3, 45, 52)
    with torch.no_grad():
        expected = model(x)
    fast = optimize_for_inference(model)
    assert not fast.training and fast.trunk.conv2_1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.allclose(fast(x), expected, atol=1e-5, rtol=1e-4)
