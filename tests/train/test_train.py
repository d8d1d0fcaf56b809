"""The train stage: optimiser and loss as the reference, stage chaining, Ray Train runs.

The first tests need no Ray. The rest share one local Ray instance and small shards
written by a fixture (JPEG/PNG pairs stored with pyarrow as the shard contract says),
and train a width-0.0625 VGG16 FCN on 24 x 32 images for a few iterations.
"""
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import yaml

from fcn_models.checkpoint import load_checkpoint, save_checkpoint
from fcn_models.fcn import build_fcn
from fcn_models.metrics import SCORE_KEYS, ConfusionMatrix
from fcn_models.preprocess import normalize
from pipelines.core.params import input_norm, parse_params
from pipelines.stages import train as train_stage
from pipelines.train import loop, recipe, trainer
from support.training import N_VAL, SIZES, WIDTH, make_params, read_history, write_shards



# --------------------------------------------------------------------------- shards and params







# --------------------------------------------------------------------------- optimiser and loss

def tiny(variant="fcn32s"):
    torch.manual_seed(0)
    return build_fcn(variant, width=WIDTH)


def test_optimizer_groups_as_the_reference():
    model = tiny("fcn16s")
    loop.freeze_for_stage(model, fixed=False)
    optimizer = loop.make_optimizer(model, lr=1e-10, momentum=0.99, weight_decay=5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {("biases" if all(names[id(p)].endswith("bias") for p in g["params"]) else "weights"): g
              for g in optimizer.param_groups}
    assert set(groups) == {"weights", "biases"}
    assert groups["weights"]["lr"] == 1e-10 and groups["weights"]["weight_decay"] == 5e-4
    assert groups["biases"]["lr"] == 2e-10 and groups["biases"]["weight_decay"] == 0.0
    assert all(g["momentum"] == 0.99 for g in optimizer.param_groups)
    assert not any(names[id(p)].endswith("bias") for p in groups["weights"]["params"])

    in_groups = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    upsampling = [n for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)]
    assert sorted(upsampling) == ["upscore16", "upscore2"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{u}.weight" for u in upsampling}
    # Every learning parameter in exactly one group, no frozen one in any.
    assert set(in_groups) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_sgd_step_gives_biases_twice_the_rate_and_no_decay():
    model = tiny()
    loop.freeze_for_stage(model, fixed=False)
    lr, decay = 0.1, 0.5
    optimizer = loop.make_optimizer(model, lr=lr, momentum=0.9, weight_decay=decay)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    optimizer.step()
    after = dict(model.named_parameters())
    # First step: the momentum buffer is the gradient plus decay x weight.
    w = before["trunk.conv1_1.weight"]
    assert torch.allclose(after["trunk.conv1_1.weight"], w - lr * (1 + decay * w))
    b = before["trunk.conv1_1.bias"]
    assert torch.allclose(after["trunk.conv1_1.bias"], b - 2 * lr * torch.ones_like(b))
    assert torch.equal(after["upscore.weight"], before["upscore.weight"])


def test_fixed_stage_trains_only_the_score_layer():
    model = tiny()
    loop.freeze_for_stage(model, fixed=True)
    optimizer = loop.make_optimizer(model, lr=1e-10, momentum=0.99, weight_decay=5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    in_groups = sorted(names[id(p)] for g in optimizer.param_groups for p in g["params"])
    assert in_groups == ["score_fr.bias", "score_fr.weight"]
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == in_groups


def test_loss_summed_or_averaged_over_valid_pixels():
    # Three pixels, two classes; the third pixel is void and must not count.
    # Pixel 1: scores (0, 0), truth 0 -> ln 2. Pixel 2: scores (0, ln 3), truth 1 -> ln(4/3).
    logits = torch.tensor([[0.0, 0.0, 50.0], [0.0, math.log(3.0), -50.0]]).reshape(1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    expected = math.log(2.0) + math.log(4.0 / 3.0)
    assert loop.segmentation_loss(logits, labels, "sum").item() == pytest.approx(expected, rel=1e-6)
    assert loop.segmentation_loss(logits, labels, "mean").item() == pytest.approx(expected / 2, rel=1e-6)
    all_void = torch.full((1, 1, 3), 255)
    assert loop.segmentation_loss(logits, all_void, "mean").item() == 0.0
    with pytest.raises(ValueError, match="'max'"):
        loop.segmentation_loss(logits, labels, "max")


# --------------------------------------------------------------------------- stages and their starting weights

def test_stage_names_give_their_network():
    assert recipe.stage_variant("fcn32s-fixed") == "fcn32s"
    assert recipe.stage_variant("fcn8s-atonce") == "fcn8s-atonce"
    with pytest.raises(recipe.StageError, match="fcn64s"):
        recipe.stage_variant("fcn64s")


def test_missing_previous_stage_says_which_stage_to_run_first(tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"train": {"models_dir": str(tmp_path / "models")}}))
    assert train_stage.main(["--stage", "fcn16s", "--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert "--stage fcn32s" in err and str(tmp_path / "models" / "fcn32s") in err
    assert train_stage.main(["--stage", "fcn4s", "--params", str(params_file)]) == 1
    assert "unknown stage 'fcn4s'" in capsys.readouterr().err


def test_absent_imagenet_weights_mean_random_init_said_loudly(tmp_path, capsys):
    params = parse_params({"model": {"imagenet_weights": str(tmp_path / "vgg16.pth")}})
    init = recipe.resolve_init(params, "fcn32s")
    assert init == recipe.StageInit(source="random", path=None,
                                    note=f"random (imagenet weights not found at {tmp_path / 'vgg16.pth'})")
    trainer.warn_random_init("fcn32s", init.note)
    err = capsys.readouterr().err
    assert "WARNING" in err and "RANDOM" in err and str(tmp_path / "vgg16.pth") in err

    (tmp_path / "vgg16.pth").write_bytes(b"")
    assert recipe.resolve_init(params, "fcn8s-atonce").source == "imagenet"


def test_fcn16s_starts_from_fcn32s_with_a_silent_skip(tmp_path):
    fcn32s = tiny("fcn32s")
    with torch.no_grad():  # a trained-looking score layer, so the comparison means something
        fcn32s.score_fr.weight.normal_(0, 0.1)
        fcn32s.score_fr.bias.normal_(0, 0.1)
    save_checkpoint(tmp_path / "models" / "fcn32s", fcn32s, {"stage": "fcn32s"})
    params = parse_params({"model": {"width": WIDTH}, "train": {"models_dir": str(tmp_path / "models")}})
    init = recipe.resolve_init(params, "fcn16s")
    assert init.source == "fcn32s"
    fcn16s = loop.initial_model(loop.stage_config(params, "fcn16s", init))
    assert fcn16s.variant == "fcn16s"
    s32, s16 = fcn32s.state_dict(), fcn16s.state_dict()
    # Everything but FCN-32s's own x32 upsampling carries over, bit for bit.
    assert set(s32) - set(s16) == {"upscore.weight"}
    assert all(torch.equal(s16[name], s32[name]) for name in s32 if name in s16)
    # The new skip starts at zero: FCN-16s computes FCN-32s's coarse scores, nothing added.
    x = torch.randn(2, 3, 37, 45)
    fcn32s.eval(), fcn16s.eval()
    with torch.no_grad():
        taps = fcn16s.extract(x, ["pool4"])
        assert taps["pool4"].abs().max() > 0
        assert fcn16s.score_pool4(taps["pool4"]).abs().max() == 0
        coarse = [m.score_fr(m.extract(x, [m.trunk.score_source])[m.trunk.score_source]) for m in (fcn32s, fcn16s)]
    assert coarse[0].abs().max() > 0.01 and torch.equal(coarse[0], coarse[1])


def test_starting_weights_that_do_not_fit_fail_before_any_training(tmp_path):
    weights = tmp_path / "vgg16.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64)}, weights)
    params = parse_params({"model": {"width": WIDTH, "imagenet_weights": str(weights)},
                           "train": {"models_dir": str(tmp_path / "models")}})
    init = recipe.resolve_init(params, "fcn32s")
    with pytest.raises(recipe.StageError, match=f"cannot start fcn32s from imagenet \\({weights}\\).*width"):
        loop.initial_model(loop.stage_config(params, "fcn32s", init))

    # An FCN-32s of another width cannot seed FCN-16s.
    save_checkpoint(tmp_path / "models" / "fcn32s", build_fcn("fcn32s", width=2 * WIDTH))
    init = recipe.resolve_init(params, "fcn16s")
    with pytest.raises(recipe.StageError, match="retrain fcn32s with the current model"):
        loop.initial_model(loop.stage_config(params, "fcn16s", init))


def test_default_run_name_follows_what_decides_the_result(tmp_path):
    write_shards(tmp_path / "shards")
    stages = {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 10}}
    init = recipe.StageInit(source="random", path=None, note="random")
    name = recipe.run_name(make_params(tmp_path, stages), "fcn32s", init, tmp_path)
    assert name.startswith("fcn32s-")
    # More iterations continue the same run; another learning rate is another run.
    longer = {"fcn32s": {**stages["fcn32s"], "iterations": 20}}
    assert recipe.run_name(make_params(tmp_path, longer), "fcn32s", init, tmp_path) == name
    faster = {"fcn32s": {**stages["fcn32s"], "lr": 1e-2}}
    assert recipe.run_name(make_params(tmp_path, faster), "fcn32s", init, tmp_path) != name


# --------------------------------------------------------------------------- Ray Train runs

@pytest.fixture(scope="module")
def fcn32s_run(tmp_path_factory, ray_cluster):
    """FCN-32s trained for 4 iterations on 2 workers, validated at 2 and 4."""
    root = tmp_path_factory.mktemp("runs")
    write_shards(root / "shards")
    stages = {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 4}}
    params = make_params(root, stages)
    metrics = trainer.run_stage(params, "fcn32s", root, run_name="e2e", trace_dir=str(root / "trace"))
    return root, params, metrics


def test_stage_writes_model_metrics_and_history(fcn32s_run):
    root, params, metrics = fcn32s_run
    written = json.loads((root / "reports" / "fcn32s" / "metrics.json").read_text())
    assert written == metrics
    assert written["iterations"] == 4 and written["best_iteration"] in (2, 4)
    assert written["init"] == "random (imagenet weights not found at model.imagenet_weights (null))"
    for key in SCORE_KEYS:
        assert 0.0 <= written[key] <= 1.0
    # Mostly background pixels: a net that learnt anything gets most of them right.
    assert written["pixel_acc"] > 0.4

    history = read_history(root / "reports" / "fcn32s" / "history.csv")
    assert [row["iteration"] for row in history] == [2, 4]
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in history)
    best = max(history, key=lambda row: row["mean_iu"])
    assert best["mean_iu"] == pytest.approx(written["mean_iu"])

    model, meta = load_checkpoint(root / "models" / "fcn32s")
    assert (meta["variant"], meta["backbone"], meta["width"], meta["num_classes"]) == ("fcn32s", "vgg16", WIDTH, 21)
    assert meta["input_norm"]["name"] == input_norm(params).name == "torchvision-rgb"
    assert meta["stage"] == "fcn32s" and meta["iterations"] == written["best_iteration"]
    assert meta["val"]["mean_iu"] == pytest.approx(written["mean_iu"])
    # Nothing half-written or temporary left beside the outputs.
    assert [p.name for p in (root / "models").iterdir()] == ["fcn32s"]
    assert sorted(p.name for p in (root / "reports" / "fcn32s").iterdir()) == ["history.csv", "metrics.json",
                                                                              "timing.json"]
    timing = json.loads((root / "reports" / "fcn32s" / "timing.json").read_text())
    assert sorted(timing) == ["data_start_s", "join_ray_s", "outputs_s", "train_s", "val_s"]
    assert timing["train_s"] > 0 and timing["val_s"] > 0 and all(v >= 0 for v in timing.values())
    assert meta["val"]["per_class_iu"][3] is None  # a class never seen: null, not NaN


def test_validation_merged_over_workers_equals_one_pass_over_all_of_val(fcn32s_run):
    """The val confusion matrix of the 2-worker run equals this process scoring every val image."""
    from pipelines.data.dataset import decode_sample

    root, params, _ = fcn32s_run
    model, meta = load_checkpoint(root / "models" / "fcn32s")
    model.eval()
    single = ConfusionMatrix(21)
    table = pq.read_table(root / "shards" / "val")
    with torch.no_grad():
        for row in table.to_pylist():
            image, label = decode_sample(row["id"], row["image"], row["label"])
            scores = model(normalize(image, model.input_norm)[None])
            single.update(scores.argmax(1)[0], torch.from_numpy(label))
    assert single.total == sum(h * w - w for h, w in (SIZES[i % 2] for i in range(N_VAL)))
    assert np.array_equal(np.array(meta["confusion_matrix"]), single.matrix)


def test_same_run_name_resumes_from_its_last_checkpoint(fcn32s_run):
    root, params, _ = fcn32s_run
    # One worker this time: a run's checkpoints do not depend on how many workers wrote them.
    longer = make_params(root, {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 6}}, workers=1,
                         models_dir=str(root / "models-longer"), reports_dir=str(root / "reports-longer"))
    metrics = trainer.run_stage(longer, "fcn32s", root, run_name="e2e", trace_dir=str(root / "trace"))
    log = (root / "trace" / "iterations.log").read_text().splitlines()
    starts = [line for line in log if line.startswith("start ")]
    assert starts == ["start 1 0", "start 2 4"]
    assert [line for line in log if line.startswith("2 ")] == ["2 5", "2 6"]
    assert metrics["iterations"] == 6
    history = read_history(root / "reports-longer" / "fcn32s" / "history.csv")
    assert [row["iteration"] for row in history] == [2, 4, 6]


def test_fewer_iterations_than_the_run_trained_are_refused_before_training(fcn32s_run, capsys):
    """DVC re-runs a stage whose iteration count went down; the run of that name cannot give it."""
    root, _, _ = fcn32s_run
    shorter = make_params(root, {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 3}},
                          models_dir=str(root / "models-shorter"), reports_dir=str(root / "reports-shorter"))
    with pytest.raises(recipe.StageError) as caught:
        trainer.run_stage(shorter, "fcn32s", root, run_name="e2e")
    message = str(caught.value)
    assert "run e2e has trained " in message and "more than the 3 that train.stages.fcn32s.iterations" in message
    assert str(root / "ray_results" / "e2e") in message
    assert not (root / "models-shorter").exists() and not (root / "reports-shorter").exists()

