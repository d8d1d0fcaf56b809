"""`fcn standin`: the ImageNet stand-in classifier, its files, and the FCN's surgery on it."""
import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torchvision

from fcn_models import build_fcn
from fcn_models.backbones import scaled
from fcn_models.norms import TORCHVISION_RGB
from fcn_models.preprocess import normalize
from fcn_models.surgery import load_imagenet_weights
from fcn_models.voc import class_names
from fcn_models.weights import read_state_dict
from pipelines import cli
from pipelines.data.synthetic import object_crops
from pipelines.train import standin

WIDTH = 1 / 16  # the demo's is 1/8; half as wide trains four times faster here
STEPS = 3
HELDOUT = 20


def _run(out, *extra, seed=0, steps=STEPS):
    budget = list(extra) or ["--steps", str(steps)]
    return cli.main(["standin", "--out", str(out), "--width", str(WIDTH), "--seed", str(seed),
                     "--heldout", str(HELDOUT), *budget])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs with seed 0 and one with seed 1, each STEPS steps: their weights files."""
    root = tmp_path_factory.mktemp("standin")
    paths = {"a": root / "a" / "vgg16.pth", "b": root / "b" / "vgg16.pth", "seed1": root / "c" / "vgg16.pth"}
    assert _run(paths["a"]) == 0
    assert _run(paths["b"]) == 0
    assert _run(paths["seed1"], seed=1) == 0
    return paths


def _meta(path):
    return json.loads(path.with_suffix(".json").read_text())


def test_the_meta_file_describes_the_weights_file(runs):
    path = runs["a"]
    meta = _meta(path)
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["file"] == path.name and meta["log"] == path.with_suffix(".csv").name
    assert meta["command"] == (f"fcn standin --out {path} --width {WIDTH} --seed 0 --heldout {HELDOUT} "
                               f"--steps {STEPS}")
    assert (meta["seed"], meta["width"], meta["steps"], meta["heldout_images"]) == (0, WIDTH, STEPS, HELDOUT)
    assert meta["image_size"] == 224 and meta["input_norm"] == TORCHVISION_RGB.name
    assert meta["classes"] == class_names()[1:]
    assert meta["git_commit"] is None or len(meta["git_commit"]) == 40
    assert meta["seconds"] > 0
    for key in ("heldout_top1", "heldout_top1_float32", "heldout_top1_batch_norm"):
        assert 0 <= meta[key] <= 1
    # Half precision only where it keeps the accuracy; the file holds what the meta says.
    state = read_state_dict(path)
    assert {str(v.dtype) for v in state.values()} == {f"torch.{meta['dtype']}"}
    if meta["dtype"] == "float16":
        assert meta["heldout_top1_float32"] - meta["heldout_top1_float16"] <= standin.HALF_TOLERANCE
        assert meta["heldout_top1"] == meta["heldout_top1_float16"]
    else:
        assert meta["heldout_top1"] == meta["heldout_top1_float32"]
    # The last layer took the inverse of the rescaling: one RMS per ReLU, none of them left at 0.
    assert len(meta["relu_rms_before_rescale"]) == 15 and min(meta["relu_rms_before_rescale"]) > 0


def test_the_training_log_has_a_row_per_logged_step_and_the_last_evaluation(runs):
    rows = list(csv.DictReader(runs["a"].with_suffix(".csv").open()))
    assert [int(r["step"]) for r in rows] == [STEPS]  # fewer steps than LOG_EVERY: only the last
    last = rows[-1]
    assert float(last["heldout_top1"]) == _meta(runs["a"])["heldout_top1_batch_norm"]
    assert float(last["loss"]) > 0 and 0 <= float(last["train_top1"]) <= 1
    assert float(last["lr"]) == pytest.approx(standin.lr_at(STEPS - 1, STEPS), rel=1e-2)


def _scaled_shape(key, wide):
    """A width-1 vgg16 tensor's shape at WIDTH, with 20 outputs."""
    fc = scaled(4096, WIDTH)
    if key.startswith("features."):
        out = (scaled(wide[0], WIDTH),)
        return out if len(wide) == 1 else out + (3 if wide[1] == 3 else scaled(wide[1], WIDTH), *wide[2:])
    return {"classifier.0.weight": (fc, scaled(512, WIDTH) * 7 * 7), "classifier.0.bias": (fc,),
            "classifier.3.weight": (fc, fc), "classifier.3.bias": (fc,),
            "classifier.6.weight": (20, fc), "classifier.6.bias": (20,)}[key]


def test_the_file_is_torchvision_vgg16_at_the_width(runs):
    state = read_state_dict(runs["a"])
    with torch.device("meta"):
        reference = torchvision.models.vgg16(weights=None).state_dict()
    assert list(state) == list(reference)
    for key, tensor in state.items():
        assert tuple(tensor.shape) == _scaled_shape(key, tuple(reference[key].shape)), key
    standin.build_classifier(WIDTH, batch_norm=False).load_state_dict(state)  # strict


def test_same_seed_and_steps_give_identical_weights_another_seed_others(runs):
    a, b, other = (read_state_dict(runs[k]) for k in ("a", "b", "seed1"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _meta(runs["a"])["sha256"] == _meta(runs["b"])["sha256"]
    assert not torch.equal(a["features.0.weight"], other["features.0.weight"])


def test_the_fcn_takes_the_file_fc6_fc7_carried_over_and_relu7_is_the_classifiers_fc7(runs):
    state = read_state_dict(runs["a"])
    model = build_fcn("fcn32s", "vgg16", width=WIDTH).eval()
    loaded = load_imagenet_weights(model, runs["a"])
    assert {"trunk.fc6.weight", "trunk.fc7.weight", "trunk.conv1_1.weight"} <= set(loaded)
    trunk = model.trunk
    fc = scaled(4096, WIDTH)
    assert torch.equal(trunk.fc6.weight, state["classifier.0.weight"].float().reshape(fc, -1, 7, 7))
    assert torch.equal(trunk.fc6.bias, state["classifier.0.bias"].float())
    assert torch.equal(trunk.fc7.weight, state["classifier.3.weight"].float().reshape(fc, fc, 1, 1))
    assert torch.equal(trunk.fc7.bias, state["classifier.3.bias"].float())
    assert torch.equal(trunk.conv5_3.weight, state["features.28.weight"].float())
    # The FCN normalises pixels as the stand-in was trained on them.
    assert model.input_norm == standin.NORM == TORCHVISION_RGB

    classifier = standin.build_classifier(WIDTH, batch_norm=False).eval()
    classifier.load_state_dict({k: v.float() for k, v in state.items()})
    trunk.get_submodule(trunk.first_conv).padding = (trunk.classifier_padding,) * 2  # the classifier's
    images, _ = object_crops(7, "heldout", 0, 4, 224)
    x = normalize(images, model.input_norm)
    with torch.no_grad():
        relu7 = model.extract(x, ["relu7"])["relu7"]
        fc7 = classifier.classifier[:5](torch.flatten(classifier.avgpool(classifier.features(x)), 1))
    assert relu7.shape == (4, fc, 1, 1)
    assert fc7.abs().max() > 0
    assert ((relu7[:, :, 0, 0] - fc7).abs().max() / fc7.abs().max()).item() < 1e-5


def test_folding_and_rescaling_keep_the_scores_and_give_unit_relu_outputs():
    torch.manual_seed(3)
    trained = standin.build_classifier(WIDTH, batch_norm=True)
    with torch.no_grad():  # batch-norm statistics and affine parameters far from the identity
        for m in trained.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.1, 4)
                m.weight.uniform_(0.2, 3)
                m.bias.uniform_(-0.5, 0.5)
    trained.eval()
    images, _ = object_crops(5, "heldout", 0, 6, 224)
    x = normalize(images, standin.NORM)
    with torch.no_grad():
        expected = trained(x)
        plain = standin.fold_batch_norm(trained, WIDTH)
        folded = plain(x)
        before = standin.rescale_activations(plain, x)
        rms = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: rms.append(o.square().mean().sqrt().item()))
                 for m in plain.modules() if isinstance(m, torch.nn.ReLU)]
        rescaled = plain(x)
    for h in hooks:
        h.remove()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    scale = expected.abs().max()
    assert (folded - expected).abs().max() / scale < 1e-5
    assert (rescaled - expected).abs().max() / scale < 1e-4
    assert len(rms) == len(before) == 15
    assert max(before) / min(before) > 2  # there was something to rescale
    assert rms == pytest.approx([1.0] * 15, rel=1e-4)


def test_minutes_fix_the_steps_and_the_meta_records_them(tmp_path):
    out = tmp_path / "m.pth"
    assert _run(out, "--minutes", "0.01") == 0  # spent before the warm-up ends: it stops there
    meta = _meta(out)
    assert 1 <= meta["steps"] < standin.WARMUP_STEPS
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert int(rows[-1]["step"]) == meta["steps"] and rows[-1]["heldout_top1"] != ""


def test_a_step_count_decided_late_keeps_the_learning_rates_already_used():
    for step in range(1, 400):
        total = standin.total_decaying_from(step)
        assert standin.decay_start(total) == step and total - step == total // standin.DECAY_SHARE
        # --minutes ran steps 0 .. step - 1 before it knew total: --steps total uses the same rates.
        assert all(standin.lr_at(i, None) == standin.lr_at(i, total) for i in range(step))
    rates = [standin.lr_at(i, 300) for i in range(300)]
    assert rates[standin.WARMUP_STEPS - 1] == rates[239] == standin.LEARNING_RATE
    assert rates[0] < rates[1] < rates[standin.WARMUP_STEPS - 1]
    assert all(a > b > 0 for a, b in zip(rates[240:], rates[241:]))


@pytest.mark.parametrize("width", ["0", "-1", "5", "nan"])
def test_a_width_out_of_range_is_refused_before_anything_is_written(tmp_path, capsys, width):
    out = tmp_path / "sub" / "s.pth"
    assert cli.main(["standin", "--out", str(out), "--width", width, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--width {float(width)!r}" in err and "(0, 4]" in err
    assert not (tmp_path / "sub").exists()


def test_an_out_under_a_file_names_the_file(tmp_path, capsys):
    blocker = tmp_path / "weights"
    blocker.write_text("not a directory")
    out = blocker / "standin" / "s.pth"
    assert cli.main(["standin", "--out", str(out), "--width", "0.125", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{blocker} is a file, not a directory" in err
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("name, expected", [("dir", "is a directory"), ("s.pt", "<name>.pth")])
def test_an_out_that_is_no_pth_file_is_refused(tmp_path, capsys, name, expected):
    out = tmp_path / name
    if name == "dir":
        out = tmp_path / "dir.pth"
        out.mkdir()
    assert cli.main(["standin", "--out", str(out), "--width", "0.125", "--steps", "1"]) == 2
    assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["dir.pth"] if name == "dir" else [])


def test_steps_and_minutes_are_one_or_the_other(tmp_path, capsys):
    args = ["standin", "--out", str(tmp_path / "s.pth"), "--width", "0.125"]
    assert cli.main([*args, "--steps", "1", "--minutes", "1"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert cli.main(args) == 2
    assert "one of the arguments --steps --minutes is required" in capsys.readouterr().err
    assert cli.main([*args, "--steps", "0"]) == 2
    assert "--steps 0: must be between 1 and" in capsys.readouterr().err


def test_the_shipped_standin_is_the_one_its_meta_describes_and_the_demo_starts_from_it():
    from pipelines.commands.demo import compose_profile
    from pipelines.core.params import PROJECT_ROOT

    demo = compose_profile(PROJECT_ROOT, [])
    weights = Path(demo.model.imagenet_weights)
    assert weights.is_relative_to(PROJECT_ROOT / "models" / "standin")
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == meta["sha256"]
    assert meta["width"] == demo.model.width and meta["seed"] == 0
    # Good enough to transfer: the held-out top-1 of the 20-way classifier it was shipped with.
    assert meta["heldout_top1"] >= 0.9
    model = build_fcn("fcn32s", "vgg16", width=demo.model.width)
    loaded = load_imagenet_weights(model, weights)
    assert {"trunk.fc6.weight", "trunk.fc7.weight", "trunk.conv1_1.weight"} <= set(loaded)
    state = read_state_dict(weights)
    fc = scaled(4096, demo.model.width)
    assert torch.equal(model.trunk.fc7.weight, state["classifier.3.weight"].float().reshape(fc, fc, 1, 1))
