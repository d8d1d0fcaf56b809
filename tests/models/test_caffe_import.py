"""Importing the reference's Caffe models and pytorch-fcn's files, checked against OpenCV's Caffe importer.

The caffemodels are written here (tests/support/caffe_writer.py, no code shared with the
reader) with seeded random weights, in the reference's layer graphs at narrow
widths. OpenCV runs them from a deploy prototxt with the reference's own crop
offsets; our model runs after `fcn import`. The weights are scaled so that every
skip branch and every crop moves the output far more than the tolerance.
"""
import hashlib
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from support import caffe_writer as cw  # noqa: E402

from fcn_models import CAFFE_BGR, InputNorm, build_fcn, load_checkpoint  # noqa: E402
from fcn_models.caffe import CaffeFormatError, read_caffemodel  # noqa: E402
from fcn_models.limits import MAX_WIDTH  # noqa: E402
from fcn_models.reference import WeightsImportError, import_weights  # noqa: E402
from fcn_models.surgery import load_imagenet_weights  # noqa: E402
from pipelines.commands import import_weights as stage  # noqa: E402
from support.caffe_files import reference_weights

try:
    import cv2
    HAVE_CAFFE_IMPORTER = hasattr(cv2, "dnn") and hasattr(cv2.dnn, "readNetFromCaffe")
except ImportError:
    cv2, HAVE_CAFFE_IMPORTER = None, False
needs_opencv = pytest.mark.skipif(
    not HAVE_CAFFE_IMPORTER,
    reason="OpenCV's Caffe importer (cv2.dnn.readNetFromCaffe) is not available: OpenCV 5 removed it; "
           "install opencv-python-headless==4.14.0.94 (the version pinned in pyproject.toml)")

TOLERANCE = 1e-4
VGG_WIDTH, ALEXNET_WIDTH = 1 / 16, 1 / 8
SIZES = [(37, 53), (64, 64), (101, 77), (1, 1)]




def _image(height, width, seed=0):
    """A caffe-bgr-like input: pixel values minus the mean, in -128..128."""
    return np.random.default_rng(seed).uniform(-128, 128, (1, 3, height, width)).astype(np.float32)


def _opencv(net, caffemodel, x, output, tmp_path, crop_shift=None):
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(cw.deploy_prototxt(net, x.shape[2], x.shape[3]))
    cvnet = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    if hasattr(cvnet, "enableWinograd"):
        cvnet.enableWinograd(False)  # exact float32 convolutions, as ours
    cvnet.setInput(x)
    return cvnet.forward(output)


def _relative(ours, reference) -> float:
    scale = float(np.abs(reference).max())
    assert scale > 0
    return float(np.abs(ours - reference).max()) / scale


def _ours(directory, x):
    model, meta = load_checkpoint(directory)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy(), model, meta


NETS = {
    "fcn32s": lambda shift=None: cw.vgg16_fcn("fcn32s", VGG_WIDTH, crop_shift=shift),
    "fcn16s": lambda shift=None: cw.vgg16_fcn("fcn16s", VGG_WIDTH, crop_shift=shift),
    "fcn8s": lambda shift=None: cw.vgg16_fcn("fcn8s", VGG_WIDTH, crop_shift=shift),
    "fcn8s-atonce": lambda shift=None: cw.vgg16_fcn("fcn8s-atonce", VGG_WIDTH, crop_shift=shift),
    "alexnet-fcn32s": lambda shift=None: cw.alexnet_fcn32s(ALEXNET_WIDTH, crop_shift=shift),
}
EXPECTED = {"fcn32s": ("fcn32s", "vgg16", VGG_WIDTH), "fcn16s": ("fcn16s", "vgg16", VGG_WIDTH),
            "fcn8s": ("fcn8s", "vgg16", VGG_WIDTH), "fcn8s-atonce": ("fcn8s-atonce", "vgg16", VGG_WIDTH),
            "alexnet-fcn32s": ("fcn32s", "caffe-alexnet", ALEXNET_WIDTH)}
# (how the blobs are written, whether the upsampling is perturbed): every encoding is exercised
ENCODING = {"fcn32s": ({"packed": False}, False), "fcn16s": ({}, True), "fcn8s": ({}, True),
            "fcn8s-atonce": ({}, False), "alexnet-fcn32s": ({"packed": False}, False)}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """name -> (net, weights, caffemodel path), written once per module."""
    root = tmp_path_factory.mktemp("caffemodels")
    out = {}
    for i, (name, make) in enumerate(NETS.items()):
        net = make()
        options, perturb = ENCODING[name]
        weights = reference_weights(net, seed=10 + i, perturb_upsampling=perturb)
        path = cw.write_caffemodel(root / f"{name}.caffemodel", cw.model_layers(net, weights), **options)
        out[name] = (net, weights, path)
    return out


@pytest.fixture(scope="module")
def imported(written, tmp_path_factory):
    """name -> checkpoint directory made by import_weights."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: import_weights(path, root / name).out for name, (_, _, path) in written.items()}


# ---------------------------------------------------------------- the reader

@pytest.mark.parametrize("v1", [False, True])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("legacy, double", [(False, False), (True, False), (False, True)])
def test_reader_reads_every_encoding(tmp_path, v1, packed, legacy, double):
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((6, 3, 5, 5)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    fc = rng.standard_normal((7, 150)).astype(np.float32)
    path = cw.write_caffemodel(tmp_path / "m.caffemodel", [
        ("data", "Data", [], [], ["data"]),
        ("conv", "Convolution", [conv, bias], ["data"], ["conv"]),
        ("relu", "ReLU", [], ["conv"], ["conv"]),
        ("fc", "InnerProduct", [fc], ["conv"], ["fc"]),
    ], v1=v1, packed=packed, legacy=legacy, double=double)
    with read_caffemodel(path) as model:
        assert model.version == ("layers" if v1 else "layer")
        assert model.name == "net"
        assert [(l.name, l.type, len(l.blobs)) for l in model.layers] == [
            ("data", "Data", 0), ("conv", "Convolution", 2), ("relu", "ReLU", 0), ("fc", "InnerProduct", 1)]
        blobs = model.layers[1].blobs + model.layers[3].blobs
        expected_shapes = [(6, 3, 5, 5), (1, 1, 1, 6), (1, 1, 7, 150)] if legacy else [(6, 3, 5, 5), (6,), (7, 150)]
        assert [b.shape for b in blobs] == expected_shapes
        assert all(b.legacy_shape == legacy for b in blobs)
        for blob, values in zip(blobs, [conv, bias, fc]):
            got = blob.values()
            assert got.dtype == np.float32 and np.array_equal(got, values.reshape(-1))
            if packed and not double:  # a view of the mapped file, not a copy
                assert not got.flags.owndata and not got.flags.writeable
            del got


def test_reader_error_names_the_file_and_byte(tmp_path):
    w = np.arange(64 * 3 * 9, dtype=np.float32).reshape(64, 3, 3, 3)
    path = cw.write_caffemodel(tmp_path / "cut.caffemodel", [("conv1_1", "Convolution", [w, np.zeros(64, np.float32)])])
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size - 100])
    with pytest.raises(CaffeFormatError, match=r"cut\.caffemodel: not a readable Caffe model at byte \d+:.*"
                                               rf"file ends at byte {size - 100} \(truncated\?\)") as err:
        read_caffemodel(path)
    assert 0 <= err.value.offset < size - 100


# ---------------------------------------------------------------- against OpenCV's Caffe importer

@needs_opencv
@pytest.mark.parametrize("name", list(NETS))
def test_imported_model_computes_what_caffe_does(name, written, imported, tmp_path):
    net, _, path = written[name]
    variant, backbone, width = EXPECTED[name]
    meta = json.loads((imported[name] / "meta.json").read_text())
    assert (meta["variant"], meta["backbone"], meta["width"], meta["num_classes"]) == (variant, backbone, width, 21)
    assert InputNorm.from_dict(meta["input_norm"]) == CAFFE_BGR
    for height, width_ in SIZES:
        x = _image(height, width_, seed=height)
        reference = _opencv(net, path, x, "score", tmp_path)
        ours, _, _ = _ours(imported[name], x)
        assert ours.shape == reference.shape == (1, 21, height, width_)
        assert _relative(ours, reference) <= TOLERANCE, (name, height, width_)


@needs_opencv
@pytest.mark.parametrize("name", list(NETS))
def test_a_one_pixel_crop_error_fails_the_comparison(name, written, imported, tmp_path):
    """The comparison can see any crop that is one pixel off, and each skip branch matters."""
    net, _, path = written[name]
    crops = [layer.name for layer in net if layer.type == "Crop"]
    assert crops[-1] == "score" and len(crops) == 1 + len(load_checkpoint(imported[name])[0].fuse_steps)
    x = _image(64, 77, seed=3)
    ours, model, _ = _ours(imported[name], x)
    assert _relative(ours, _opencv(NETS[name](), path, x, "score", tmp_path)) <= TOLERANCE
    for crop in crops:
        shifted = _opencv(NETS[name]({crop: -1}), path, x, "score", tmp_path)
        assert _relative(ours, shifted) > 100 * TOLERANCE, crop
    for _, _, score_name, _ in model.fuse_steps:
        layer = getattr(model, score_name)
        with torch.no_grad():
            layer.weight.zero_(), layer.bias.zero_()
            without = model(torch.from_numpy(x)).numpy()
        assert _relative(without, ours) > 100 * TOLERANCE, score_name


def test_meta_records_the_source_and_each_tensor(written, imported):
    _, weights, path = written["fcn8s-atonce"]
    meta = json.loads((imported["fcn8s-atonce"] / "meta.json").read_text())
    data = path.read_bytes()
    source = meta["imported_from"]
    assert source["file"] == "fcn8s-atonce.caffemodel" and source["bytes"] == len(data)
    assert source["sha1"] == hashlib.sha1(data).hexdigest() and source["md5"] == hashlib.md5(data).hexdigest()
    assert source["known"] is False and source["check"].startswith("not a known file")
    assert source["format"] == "caffemodel (current `layer` messages)"
    assert meta["tensor_sources"]["trunk.conv1_1.weight"] == {"layer": "conv1_1", "blob": 0}
    assert meta["tensor_sources"]["score_pool3.bias"] == {"layer": "score_pool3", "blob": 1}
    assert meta["tensor_sources"]["upscore8.weight"] == {"layer": "upscore8", "blob": 0}
    assert meta["atonce_scales"] == {"pool4": {"layer": "scale_pool4", "shape": [32], "value": 0.01},
                                     "pool3": {"layer": "scale_pool3", "shape": [16], "value": 0.0001}}
    assert meta["upsampling"]["upscore8"] == "kernel 16, stride 8, bilinear"
    model, _ = load_checkpoint(imported["fcn8s-atonce"])
    assert torch.equal(model.trunk.conv3_2.weight, torch.from_numpy(weights["conv3_2"][0]))
    assert torch.equal(model.score_pool3.bias, torch.from_numpy(weights["score_pool3"][1]))


def test_caffe_alexnet_trunk_is_the_reference_fcn_alexnet():
    model = build_fcn("fcn32s", "caffe-alexnet")
    t = model.trunk
    assert model.crop_offsets() == {"score": 18}
    assert (model.upscore.kernel_size, model.upscore.stride) == ((63, 63), (32, 32))
    assert model.input_norm == CAFFE_BGR and t.imagenet_norm == CAFFE_BGR
    names = list(t._modules)
    assert names[:names.index("conv3")] == ["conv1", "relu1", "pool1", "norm1", "conv2", "relu2", "pool2", "norm2"]
    convs = {n: (m.out_channels, m.groups, m.kernel_size[0]) for n, m in t.named_children() if isinstance(m, nn.Conv2d)}
    assert convs == {"conv1": (96, 1, 11), "conv2": (256, 2, 5), "conv3": (384, 1, 3), "conv4": (384, 2, 3),
                     "conv5": (256, 2, 3), "fc6": (4096, 1, 6), "fc7": (4096, 1, 1)}
    assert t.conv1.padding == (100, 100) and t.conv1.stride == (4, 4)
    lrn = t.norm1
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 1.0)
    assert model.receptive_field() == 355
    narrow = build_fcn("fcn8s", "caffe-alexnet", width=ALEXNET_WIDTH).eval()
    with torch.no_grad():
        for h, w in [(1, 1), (17, 32), (33, 31)]:
            assert narrow(torch.zeros(1, 3, h, w)).shape == (1, 21, h, w)
    with pytest.raises(ValueError, match="caffe-alexnet.*fcn import"):
        load_imagenet_weights(model, {})


# ---------------------------------------------------------------- the VGG16 ImageNet classifier

@pytest.fixture(scope="module")
def vgg16_caffemodel(tmp_path_factory):
    """A full-size VGG_ILSVRC_16_layers-style caffemodel: legacy V1 layers and 4-D legacy blob dims."""
    net = cw.vgg16_classifier()
    rng = np.random.default_rng(5)
    weights = {}
    for layer in net:
        if layer.blob_shapes:
            w_shape, b_shape = layer.blob_shapes
            std = np.float32(np.sqrt(2.0 / np.prod(w_shape[1:])))
            w = rng.standard_normal(w_shape, dtype=np.float32)
            w *= std
            weights[layer.name] = [w, (rng.standard_normal(b_shape) * 0.1).astype(np.float32)]
    path = tmp_path_factory.mktemp("vgg") / "VGG_ILSVRC_16_layers.caffemodel"
    cw.write_caffemodel(path, cw.model_layers(net, weights), v1=True, legacy=True)
    return net, path


@needs_opencv
def test_vgg16_classifier_becomes_torchvision_vgg16_with_caffe_outputs(vgg16_caffemodel, tmp_path):
    net, path = vgg16_caffemodel
    assert path.stat().st_size > 500e6
    result = import_weights(path, tmp_path / "vgg16_caffe.pth")
    assert result.kind == "classifier" and result.tensors == 32 and result.values == 138_357_544
    assert result.source["format"] == "caffemodel (legacy V1 `layers` messages)"
    state = torch.load(tmp_path / "vgg16_caffe.pth", weights_only=True)
    classifier = torchvision.models.vgg16(weights=None)
    classifier.load_state_dict(state)  # strict: every key, every shape
    classifier.eval()
    x = _image(224, 224, seed=7)
    fc8, fc7 = _opencv(net, path, x, ["fc8", "relu7"], tmp_path)
    with torch.no_grad():
        ours = classifier(torch.from_numpy(x)).numpy()
    assert ours.shape == fc8.shape == (1, 1000)
    assert _relative(ours, fc8) <= TOLERANCE

    # surgery makes FCN-32s of it; with the classifier's padding its fc7 is Caffe's fc7
    model = build_fcn("fcn32s", "vgg16").eval()
    load_imagenet_weights(model, tmp_path / "vgg16_caffe.pth", norm=CAFFE_BGR)
    assert model.input_norm == CAFFE_BGR
    model.trunk.conv1_1.padding = (1, 1)
    with torch.no_grad():
        relu7 = model.extract(torch.from_numpy(x), ["relu7"])["relu7"]
    assert relu7.shape == (1, 4096, 1, 1)
    assert _relative(relu7[:, :, 0, 0].numpy(), fc7) <= TOLERANCE
    del model, classifier

    # pytorch-fcn's vgg16_from_caffe.pth is this same torchvision-format state dict
    again = import_weights(tmp_path / "vgg16_caffe.pth", tmp_path / "again.pth")
    assert again.source["format"] == "PyTorch state dict"
    state2 = torch.load(tmp_path / "again.pth", weights_only=True)
    assert state2.keys() == state.keys() and all(torch.equal(state[k], state2[k]) for k in state)


# ---------------------------------------------------------------- pytorch-fcn's files

def _pytorch_fcn_state(weights: dict) -> dict:
    """A state dict as pytorch-fcn's FCN models save it: reference layer names as module
    names, the at-once Scale layers left out (its converter skips them)."""
    state = {}
    for layer, blobs in weights.items():
        if layer.startswith("scale_"):
            continue
        state[f"{layer}.weight"] = torch.from_numpy(blobs[0].copy())
        if len(blobs) > 1:
            state[f"{layer}.bias"] = torch.from_numpy(blobs[1].copy())
    return state


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce"])
def test_pytorch_fcn_state_dict_imports_to_the_same_checkpoint(name, written, imported, tmp_path):
    _, weights, _ = written[name]
    pth = tmp_path / f"mine_{name}.pth"
    # pytorch-fcn's files date from before torch's zip format: write one of them the old way
    torch.save(_pytorch_fcn_state(weights), pth, _use_new_zipfile_serialization=name != "fcn16s")
    variant = "fcn8s-atonce" if name == "fcn8s-atonce" else None
    result = import_weights(pth, tmp_path / "ckpt", variant=variant)
    if name == "fcn8s":
        assert any("--variant fcn8s-atonce" in note for note in result.notes)
    ours = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    from_caffe = torch.load(imported[name] / "model.pt", weights_only=True)
    assert ours.keys() == from_caffe.keys()
    assert all(torch.equal(ours[k], from_caffe[k]) for k in ours)
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    meta_caffe = json.loads((imported[name] / "meta.json").read_text())
    for key in ("variant", "backbone", "width", "num_classes", "input_norm"):
        assert meta[key] == meta_caffe[key]
    assert meta["tensor_sources"]["trunk.fc6.weight"] == {"key": "fc6.weight"}


# ---------------------------------------------------------------- bad input

def _fcn8s_layers(written, drop=(), replace=None, add=()):
    net, weights, _ = written["fcn8s"]
    weights = {k: v for k, v in weights.items() if k not in drop}
    weights.update(replace or {})
    return cw.model_layers(net, weights) + list(add)


def _fails(capsys, source, out, pattern):
    """The command exits 1 with one line naming the file, and writes nothing."""
    code = stage.main([str(source), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert source.name in err
    assert not out.exists()
    with pytest.raises(WeightsImportError, match=pattern):
        import_weights(source, out)
    return err


def test_truncated_file(written, tmp_path, capsys):
    data = written["fcn8s"][2].read_bytes()
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(data[: len(data) * 2 // 3])
    err = _fails(capsys, cut, tmp_path / "out", r"cut\.caffemodel.*at byte \d+.*truncated")
    assert f"file ends at byte {len(data) * 2 // 3}" in err


def test_garbage_file(tmp_path, capsys):
    junk = tmp_path / "junk.caffemodel"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _fails(capsys, junk, tmp_path / "out", r"junk\.caffemodel: not a readable Caffe model at byte \d+")
    text = tmp_path / "notes.caffemodel"
    text.write_text("this is not a model\n" * 10)
    _fails(capsys, text, tmp_path / "out", r"notes\.caffemodel: not a readable Caffe model")


def test_missing_layer(written, tmp_path, capsys):
    path = cw.write_caffemodel(tmp_path / "m.caffemodel", _fcn8s_layers(written, drop=("score_pool4",)))
    _fails(capsys, path, tmp_path / "out", r"missing layer 'score_pool4'.*fcn8s.*score_pool4\.weight \(21, 32, 1, 1\)")


def test_extra_layer(written, tmp_path, capsys):
    extra = ("conv6_1", "Convolution", [np.zeros((8, 32, 3, 3), np.float32), np.zeros(8, np.float32)])
    path = cw.write_caffemodel(tmp_path / "m.caffemodel", _fcn8s_layers(written, add=[extra]))
    _fails(capsys, path, tmp_path / "out", r"extra layer 'conv6_1' \(weights \(8, 32, 3, 3\), \(8,\)\)")


def test_wrong_shape(written, tmp_path, capsys):
    _, weights, _ = written["fcn8s"]
    bad = {"conv3_2": [np.zeros((16, 15, 3, 3), np.float32), weights["conv3_2"][1]]}
    path = cw.write_caffemodel(tmp_path / "m.caffemodel", _fcn8s_layers(written, replace=bad))
    _fails(capsys, path, tmp_path / "out",
           r"layer 'conv3_2' blob 0 has shape \(16, 15, 3, 3\), a width-0.0625 vgg16 fcn8s .* needs \(16, 16, 3, 3\)")


def test_wrong_atonce_scale(written, tmp_path, capsys):
    net, weights, _ = written["fcn8s-atonce"]
    for blob, pattern in [(np.full(32, 0.02, np.float32), r"scale_pool4' multiplies channel 0 by 0\.02"),
                          (np.full(1, 0.01, np.float32), r"scale_pool4' has weights \[\(1,\)\].*\(32,\) blob")]:
        path = cw.write_caffemodel(tmp_path / "m.caffemodel", cw.model_layers(net, {**weights, "scale_pool4": [blob]}))
        _fails(capsys, path, tmp_path / "out", pattern)


def test_known_file_name_with_other_content_is_refused(written, tmp_path, capsys):
    fake = tmp_path / "fcn8s-heavy-pascal.caffemodel"
    fake.write_bytes(written["fcn8s"][2].read_bytes())
    sha1 = hashlib.sha1(fake.read_bytes()).hexdigest()
    err = _fails(capsys, fake, tmp_path / "out", "sha1")
    assert sha1 in err and "c449ea74dd7d83751d1357d6a8c323fcf4038962" in err

    pth = tmp_path / "fcn8s_from_caffe.pth"
    torch.save(_pytorch_fcn_state(written["fcn8s"][1]), pth)
    md5 = hashlib.md5(pth.read_bytes()).hexdigest()
    err = _fails(capsys, pth, tmp_path / "out", "md5")
    assert md5 in err and "de93e540ec79512f8770033849c8ae89" in err


def test_known_file_name_that_does_not_parse_fails_on_its_sum(written, tmp_path, capsys):
    # The sums are computed while the file is parsed; the wrong sum is still the error reported.
    fake = tmp_path / "fcn8s-heavy-pascal.caffemodel"
    fake.write_bytes(written["fcn8s"][2].read_bytes()[:-10])
    err = _fails(capsys, fake, tmp_path / "out", "sha1")
    assert hashlib.sha1(fake.read_bytes()).hexdigest() in err and "c449ea74dd7d83751d1357d6a8c323fcf4038962" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [fake.name]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_pickle_that_carries_code_is_refused_without_running_it(tmp_path, capsys, how):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    payload = {"conv1_1.weight": torch.zeros(1), "conv1_1.bias": RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    err = _fails(capsys, evil, tmp_path / "out", r"evil\.pth: refused: its pickle asks for more than tensors")
    # Only the name of the object refused (os.system, or torch's unpickler of raw pickled tensors).
    assert re.search(r"evil\.pth: refused: its pickle asks for more than tensors, so it was not run "
                     r"\(it asks for [\w.]+\)$", err.strip()), err
    assert "add_safe_globals" not in err and "weights_only" not in err
    assert not marker.exists()


def test_failed_import_leaves_an_existing_checkpoint_alone(written, imported, tmp_path):
    out = tmp_path / "ckpt"
    import_weights(written["fcn32s"][2], out)
    before = (out / "model.pt").read_bytes()
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(written["fcn8s"][2].read_bytes()[:-10])
    with pytest.raises(WeightsImportError):
        import_weights(cut, out)
    # nor does a known file name with the wrong sum
    fake = tmp_path / "fcn8s-heavy-pascal.caffemodel"
    fake.write_bytes(written["fcn8s"][2].read_bytes())
    with pytest.raises(WeightsImportError, match="sha1"):
        import_weights(fake, out)
    assert (out / "model.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "cut.caffemodel", "fcn8s-heavy-pascal.caffemodel"]


# ---------------------------------------------------------------- the command

def test_command_prints_what_it_did(written, tmp_path, capsys):
    from pipelines.cli import COMMANDS
    from pipelines.cli import main as cli_main
    assert COMMANDS["import"][0] == "pipelines.commands.import_weights"
    path = written["alexnet-fcn32s"][2]
    assert cli_main(["import", str(path), "--out", str(tmp_path / "alex")]) == 0
    out = capsys.readouterr().out
    sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
    assert "fcn32s, backbone caffe-alexnet, width 0.125, 21 classes" in out
    assert sha1 in out and "not a known file" in out and "17 tensors" in out
    model, meta = load_checkpoint(tmp_path / "alex")
    assert meta["backbone"] == "caffe-alexnet" and meta["input_norm"]["name"] == "caffe-bgr"

    # --variant wins over detection: an fcn8s file read as fcn16s lacks fcn16s's x16 upsampling
    assert stage.main([str(written["fcn8s"][2]), "--out", str(tmp_path / "x"), "--variant", "fcn16s"]) == 1
    assert "missing layer 'upscore16'" in capsys.readouterr().err


def test_command_bad_arguments_exit_2(tmp_path, capsys):
    assert stage.main([]) == 2
    assert stage.main(["x.caffemodel"]) == 2  # no --out
    assert stage.main(["x.caffemodel", "--out", str(tmp_path / "o"), "--variant", "fcn4s"]) == 2
    capsys.readouterr()
    assert stage.main([str(tmp_path / "absent.caffemodel"), "--out", str(tmp_path / "o")]) == 1
    assert "absent.caffemodel: no such file" in capsys.readouterr().err


# A zero-size blob may claim any other dimension: 2**62 channels hold no values, but a
# network built to that width could never be allocated.
HUGE = 1 << 62


def test_a_zero_size_blob_with_a_huge_dimension_is_one_line(written, tmp_path, capsys):
    huge = cw.empty_blob_layer("conv1_1", "Convolution", [(HUGE, 0, 3, 3), (0,)])
    layers = [huge if spec[0] == "conv1_1" else spec
              for spec in _fcn8s_layers(written)]
    path = cw.write_caffemodel(tmp_path / "huge.caffemodel", layers)
    err = _fails(capsys, path, tmp_path / "out", rf"conv1_1.*\({HUGE}, 0, 3, 3\)")
    assert f"{MAX_WIDTH:g}" in err


def test_a_state_dict_with_a_zero_size_tensor_of_a_huge_dimension_is_one_line(written, tmp_path, capsys):
    _, weights, _ = written["fcn32s"]
    state = _pytorch_fcn_state(weights)
    state["conv1_1.weight"] = torch.empty((HUGE, 0, 3, 3))
    state["conv1_1.bias"] = torch.empty((0,))
    path = tmp_path / "huge.pth"
    torch.save(state, path)
    err = _fails(capsys, path, tmp_path / "out", rf"conv1_1.*\({HUGE}, 0, 3, 3\)")
    assert f"{MAX_WIDTH:g}" in err


def test_an_out_path_under_a_file_names_the_file_and_writes_nothing(written, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    for out in (blocker / "fcn8s", blocker / "deeper" / "fcn8s"):
        code = stage.main([str(written["fcn8s"][2]), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1 and "Errno" not in err, err
        assert f"--out {out}: {blocker} is a file, not a directory, so nothing can be written under it" in err
    assert blocker.read_text() == "a file"


def test_a_directory_as_the_source_says_it_is_one(tmp_path, capsys):
    folder = tmp_path / "weights.caffemodel"
    folder.mkdir()
    err = _fails(capsys, folder, tmp_path / "out", "is a directory")
    assert f"{folder}: is a directory; fcn import reads one file: a .caffemodel or a PyTorch state dict" in err
