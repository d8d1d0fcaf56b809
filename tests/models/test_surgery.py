"""ImageNet weights into the convolutionalised trunk, and stage-to-stage transfer."""
import math

import pytest
import torch
import torchvision

from fcn_models import CAFFE_BGR, TORCHVISION_RGB, build_fcn
from fcn_models.geometry import chain_geometry, layer_geometry
from fcn_models.surgery import load_imagenet_weights, transfer_weights

NARROW = 1 / 8


def _set_first_padding(model, padding):
    model.trunk.get_submodule(model.trunk.first_conv).padding = (padding, padding)


def test_vgg16_fc7_map_equals_the_classifier_penultimate_activations(tmp_path):
    torch.manual_seed(0)
    classifier = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path / "vgg16.pth"
    torch.save(classifier.state_dict(), path)

    model = build_fcn("fcn32s", "vgg16").eval()
    loaded = load_imagenet_weights(model, path)
    assert "trunk.fc6.weight" in loaded and model.trunk.fc6.weight.shape == (4096, 512, 7, 7)
    assert model.input_norm == TORCHVISION_RGB
    _set_first_padding(model, 1)  # as in the classifier
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fc7 = model.extract(x, ["relu7"])["relu7"]
        expected = classifier.classifier[:5](torch.flatten(classifier.avgpool(classifier.features(x)), 1))
    assert fc7.shape == (2, 4096, 1, 1)
    assert expected.abs().max() > 0
    assert torch.allclose(fc7[:, :, 0, 0], expected, atol=1e-5, rtol=1e-4)


def test_alexnet_fc7_map_equals_the_classifier_penultimate_activations():
    torch.manual_seed(1)
    classifier = torchvision.models.alexnet(weights=None).eval()
    model = build_fcn("fcn16s", "alexnet").eval()
    load_imagenet_weights(model, classifier.state_dict(), norm=CAFFE_BGR)
    assert model.input_norm == CAFFE_BGR
    _set_first_padding(model, 2)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fc7 = model.extract(x, ["relu7"])["relu7"]
        expected = classifier.classifier[:6](torch.flatten(classifier.avgpool(classifier.features(x)), 1))
    assert fc7.shape == (1, 4096, 1, 1)
    assert torch.allclose(fc7[:, :, 0, 0], expected, atol=1e-5, rtol=1e-4)


def test_googlenet_weights_load_exactly_into_the_caffe_geometry_trunk():
    # torchvision's 3x3 "5x5" kernels are centred in our 5x5 ones: same function up to
    # inception4e (pool4 is where the geometries part).
    torch.manual_seed(2)
    classifier = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in classifier.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    model = build_fcn("fcn32s", "googlenet").eval()
    load_imagenet_weights(model, classifier.state_dict())
    assert model.trunk.inception4e.branch3[1].conv.weight.shape[-2:] == (5, 5)
    _set_first_padding(model, 3)
    x = torch.randn(1, 3, 224, 224)
    seen = {}
    classifier.inception4e.register_forward_hook(lambda m, i, o: seen.__setitem__("4e", o))
    with torch.no_grad():
        classifier(x)
        ours = model.extract(x, ["inception4e"])["inception4e"]
    assert ours.shape == seen["4e"].shape == (1, 832, 14, 14)
    scale = seen["4e"].abs().max()
    assert scale > 0 and (ours - seen["4e"]).abs().max() < 1e-4 * scale


def test_missing_file_wrong_shape_and_missing_key_errors(tmp_path):
    model = build_fcn("fcn32s", "alexnet")
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_imagenet_weights(model, missing)

    state = torchvision.models.alexnet(weights=None).state_dict()
    state["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"bad\.pth.*features\.3\.weight.*\(192, 64, 3, 3\).*\(192, 64, 5, 5\)"):
        load_imagenet_weights(model, bad)

    del state["features.3.weight"]
    with pytest.raises(KeyError, match="features.3.weight"):
        load_imagenet_weights(model, state)

    narrow = build_fcn("fcn32s", "alexnet", width=0.5)
    with pytest.raises(ValueError) as err:
        load_imagenet_weights(narrow, torchvision.models.alexnet(weights=None).state_dict())
    message = str(err.value)
    assert ("features.0.weight has shape (64, 3, 11, 11) (a width-1 alexnet's, by its output channels), "
            "but the width-0.5 alexnet trunk needs (32, 3, 11, 11)") in message, message
    assert "any width whose shapes match" in message and "only" not in message


def test_a_narrow_torchvision_layout_classifier_loads_into_a_trunk_of_its_width():
    # A width-0.5 AlexNet classifier in torchvision's layout: our trunk's convolutions under
    # torchvision's names, fc6/fc7 as the Linear layers they were.
    torch.manual_seed(0)
    source = build_fcn("fcn32s", "alexnet", width=0.5).trunk
    state = {}
    for layer, prefix in source.torchvision_names.items():
        for suffix, tensor in source.get_submodule(layer).state_dict().items():
            state[f"{prefix}.{suffix}"] = tensor.flatten(1) if layer.startswith("fc") and suffix == "weight" else tensor
    narrow = build_fcn("fcn32s", "alexnet", width=0.5)
    loaded = load_imagenet_weights(narrow, state)
    assert "trunk.fc6.weight" in loaded
    assert torch.equal(narrow.trunk.fc6.weight, source.fc6.weight)
    with pytest.raises(ValueError, match=r"width-0\.5 alexnet's.*width-0\.25 alexnet trunk"):
        load_imagenet_weights(build_fcn("fcn32s", "alexnet", width=0.25), state)


def _trained(model, seed):
    """Stand-in for a trained net: every trainable tensor perturbed, score layers non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _run(model, x, replace=None):
    """Forward pass recording every head layer's output; `replace` = (layer name, tensor
    maker) swaps that layer's input for a tensor made from it (a forward pre-hook)."""
    seen, handles = {}, []
    for name, module in model.named_children():
        if name != "trunk":
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o)))
    if replace:
        name, make = replace
        handles.append(getattr(model, name).register_forward_pre_hook(lambda m, i: (make(i[0]),)))
    try:
        with torch.no_grad():
            return model(x), seen
    finally:
        for h in handles:
            h.remove()


def _ramp(t):
    """A score map affine in row and column (a different slope per class)."""
    n, c, h, w = t.shape
    rows, cols = torch.arange(h).view(1, 1, h, 1), torch.arange(w).view(1, 1, 1, w)
    k = torch.arange(1, c + 1).view(1, c, 1, 1)
    return (0.3 * k * rows - 0.2 * cols + k).to(t.dtype).expand(n, c, h, w).clone()


def _interior(out, coarse, coarse_size, margin=2):
    """Pixels at least `margin` coarse pixels inside the coarse map's first and last samples."""
    first = max(0, math.ceil(coarse.offset + margin * coarse.stride))
    last_row = math.floor(coarse.offset + (coarse_size[-2] - 1 - margin) * coarse.stride)
    last_col = math.floor(coarse.offset + (coarse_size[-1] - 1 - margin) * coarse.stride)
    assert first + 64 < min(last_row, last_col)  # a real region is compared
    return out[..., first:last_row + 1, first:last_col + 1]


@pytest.mark.parametrize("backbone", ["vgg16", "googlenet"])
def test_staged_transfer_starts_with_unmodified_predictions(backbone):
    """32s -> 16s -> 8s: the new net computes the old net's coarse scores exactly and its new skip
    adds nothing. Its output is those scores upsampled by x2 then x16 bilinear steps instead
    of one x32 step; the two agree exactly wherever the scores are locally linear (checked with
    an affine score map), and differ by interpolation error elsewhere."""
    x = torch.randn(1, 3, 300, 280)
    fcn32 = _trained(build_fcn("fcn32s", backbone, width=NARROW, input_norm=CAFFE_BGR), 0).eval()
    fcn16 = build_fcn("fcn16s", backbone, width=NARROW).eval()
    report = transfer_weights(fcn32, fcn16)
    tap16, tap8 = fcn16.trunk.taps[16], fcn16.trunk.taps[8]
    assert set(report.left_at_init) == {f"score_{tap16}.weight", f"score_{tap16}.bias",
                                        "upscore2.weight", "upscore16.weight"}
    assert report.unused == ["upscore.weight"]
    assert fcn16.input_norm == CAFFE_BGR

    out32, seen32 = _run(fcn32, x)
    out16, seen16 = _run(fcn16, x)
    assert seen32["score_fr"].abs().max() > 1e-3
    assert torch.equal(seen16["score_fr"], seen32["score_fr"])
    assert torch.equal(seen16[f"score_{tap16}"], torch.zeros_like(seen16[f"score_{tap16}"]))
    coarse = chain_geometry([*fcn32.trunk.layers_until(fcn32.trunk.score_source), fcn32.score_fr])
    ramp32, _ = _run(fcn32, x, ("upscore", _ramp))
    ramp16, _ = _run(fcn16, x, ("upscore2", _ramp))
    size = seen32["score_fr"].shape
    assert torch.allclose(_interior(ramp32, coarse, size), _interior(ramp16, coarse, size), atol=1e-4)

    _trained(fcn16, 1)
    fcn8 = build_fcn("fcn8s", backbone, width=NARROW).eval()
    report = transfer_weights(fcn16.state_dict(), fcn8)
    assert set(report.left_at_init) == {f"score_{tap8}.weight", f"score_{tap8}.bias",
                                        f"upscore_{tap16}.weight", "upscore8.weight"}
    assert not fcn8.upscore8.weight.requires_grad
    out16, seen16 = _run(fcn16, x)
    out8, seen8 = _run(fcn8, x)
    assert seen16[f"score_{tap16}"].abs().max() > 1e-3
    for name in ("score_fr", f"score_{tap16}", "upscore2"):
        assert torch.equal(seen8[name], seen16[name])
    assert torch.equal(seen8[f"score_{tap8}"], torch.zeros_like(seen8[f"score_{tap8}"]))
    fused16 = coarse.then(layer_geometry(fcn16.upscore2))
    ramp16, _ = _run(fcn16, x, ("upscore16", _ramp))
    ramp8, _ = _run(fcn8, x, (f"upscore_{tap16}", _ramp))
    size = seen16["upscore2"].shape
    assert torch.allclose(_interior(ramp16, fused16, size), _interior(ramp8, fused16, size), atol=1e-4)


def test_transfer_refuses_a_shape_mismatch():
    small = build_fcn("fcn32s", "vgg16", width=1 / 16)
    wider = build_fcn("fcn16s", "vgg16", width=1 / 8)
    with torch.no_grad():
        small.score_fr.bias.fill_(1.0)  # same shape in both: would be copied
    with pytest.raises(ValueError, match=r"trunk\.conv1_1\.weight.*\(4, 3, 3, 3\).*\(8, 3, 3, 3\)"):
        transfer_weights(small, wider)
    # all shapes are checked before anything is copied
    assert torch.equal(wider.score_fr.bias, torch.zeros(21))


def test_transfer_reports_what_it_did():
    lines = []
    transfer_weights(build_fcn("fcn32s", width=1 / 32), build_fcn("fcn16s", width=1 / 32), log=lines.append)
    assert "left at init: " in lines[0] and "score_pool4.weight" in lines[0]
