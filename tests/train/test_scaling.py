"""train.scaling: the schedule derived for the global batch, used by the loop, named in the run and its params."""
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import yaml

from pipelines.core.params import PROJECT_ROOT, ParamsError, load_params, parse_params
from pipelines.train import loop, recipe, scaling
from support.training import make_params, write_shards

RANDOM = recipe.StageInit(source="random", path=None, note="random")
LR, ITERATIONS, VAL_EVERY, WARMUP = 1e-10, 100_000, 4000, 5000


def derive(rule="linear", workers=1, images=1, loss="sum", lr=LR, iterations=ITERATIONS, val_every=VAL_EVERY,
           warmup=WARMUP, momentum=0.9, lr_step_at=None):
    return scaling.derive(rule, workers=workers, images_per_worker=images, loss=loss, lr=lr,
                          iterations=iterations, val_every=val_every, warmup_images=warmup, momentum=momentum,
                          lr_step_at=lr_step_at)


# (workers, images a worker, loss) -> (lr factor, iterations, val_every, warm-up steps) for the
# reference's 100,000 iterations, val_every 4000.
CASES = {
    (1, 1, "sum"): (1, 100_000, 4000, 0),
    (2, 1, "sum"): (2, 50_000, 2000, 2500),
    (2, 1, "mean"): (2, 50_000, 2000, 2500),
    (8, 1, "sum"): (8, 12_500, 500, 625),
    # One worker's 4 crops: a summed loss adds their gradients already; a mean divides by them.
    (1, 4, "sum"): (1, 25_000, 1000, 0),
    (1, 4, "mean"): (4, 25_000, 1000, 1250),
    (4, 2, "sum"): (4, 12_500, 500, 625),
    (4, 2, "mean"): (8, 12_500, 500, 625),
}


@pytest.mark.parametrize("workers, images, loss", sorted(CASES))
def test_linear_keeps_the_images_and_the_per_image_step(workers, images, loss):
    factor, iterations, val_every, warmup = CASES[workers, images, loss]
    derived = derive(workers=workers, images=images, loss=loss)
    assert derived.global_batch == workers * images
    assert derived.lr == pytest.approx(LR * factor, rel=1e-12) and derived.lr_factor == factor
    assert (derived.iterations, derived.val_every, derived.warmup_iterations) == (iterations, val_every, warmup)
    # The images a stage sees are the reference's 100,000 (one a step), to within one step.
    assert derived.iterations * derived.global_batch >= ITERATIONS > (derived.iterations - 1) * derived.global_batch
    assert (derived.base_lr, derived.base_iterations, derived.base_val_every) == (LR, ITERATIONS, VAL_EVERY)


def test_counts_round_up_to_whole_steps_and_validations_stay_at_least_one_step_apart():
    derived = derive(workers=3, iterations=100, val_every=5)
    assert derived.iterations == 34                   # 102 images: the 100 asked for, in whole steps
    assert derived.val_every == 2                     # 5 / 3 = 1.67
    assert derive(workers=2, val_every=5).val_every == 3   # 2.5: halves up
    assert derive(workers=8, val_every=3).val_every == 1   # never 0
    assert derive(workers=3).warmup_iterations == math.ceil(WARMUP / 3)


@pytest.mark.parametrize("loss", ["sum", "mean"])
def test_sqrt_scales_adams_lr_by_the_root_of_the_batch_and_its_betas_by_the_batch(loss):
    """Malladi et al.'s rule: whatever the loss's reduction (Adam is blind to the gradient's scale)."""
    derived = derive("sqrt", workers=2, images=2, loss=loss, lr=1e-4, iterations=1000, val_every=250, warmup=100)
    assert derived.lr == pytest.approx(2e-4, rel=1e-12) and derived.lr_factor == pytest.approx(2.0)
    assert (derived.momentum, derived.beta2) == (pytest.approx(0.6), pytest.approx(0.996))
    assert (derived.iterations, derived.val_every, derived.warmup_iterations) == (250, 63, 25)
    assert derived.note == (
        "scaling sqrt: 2 workers x 2 images = global batch 4; lr 0.0001 -> 0.0002 (x sqrt 4), iterations 1000 "
        "-> 250, val_every 250 -> 63, beta1 0.9 -> 0.6, beta2 0.999 -> 0.996, warm-up 25 steps from lr 0.0001")
    one = derive("sqrt", lr=1e-4, iterations=1000, val_every=250)
    assert (one.lr, one.momentum, one.beta2, one.iterations, one.warmup_iterations) == (1e-4, 0.9, 0.999, 1000, 0)
    for rule in ("none", "linear"):
        assert (derive(rule, workers=4).momentum, derive(rule, workers=4).beta2) == (0.9, scaling.ADAM_BETA2)


def test_the_warm_up_lasts_train_warmup_images():
    assert derive(workers=4, warmup=100).warmup_iterations == 25
    assert derive(workers=3, warmup=100).warmup_iterations == 34       # 102 images: whole steps
    assert derive(workers=4, warmup=0).warmup_iterations == 0
    assert derive(workers=4, warmup=0).note.endswith("no warm-up (lr unchanged)")
    assert derive(workers=4, iterations=400, warmup=1000).note.endswith(
        "warm-up 250 steps from lr 1e-10 (the whole stage)")


def test_the_warm_up_is_the_same_whatever_the_iteration_count():
    """More iterations continue a run: they must not change how it started."""
    assert {derive(workers=4, iterations=n).warmup_iterations for n in (400, 100_000, 300_000)} == {1250}


@pytest.mark.parametrize("workers, images, loss", sorted(CASES))
def test_none_leaves_everything_as_the_params_give_it(workers, images, loss):
    derived = derive("none", workers=workers, images=images, loss=loss)
    assert (derived.lr, derived.iterations, derived.val_every) == (LR, ITERATIONS, VAL_EVERY)
    assert derived.warmup_iterations == 0 and derived.lr_factor == 1
    assert derived.global_batch == workers * images
    assert derived.asked_iterations(7) == 7


def test_the_note_says_what_was_derived_from_what():
    assert derive(workers=2).note == (
        "scaling linear: 2 workers x 1 image = global batch 2; lr 1e-10 -> 2e-10, iterations 100000 -> 50000, "
        "val_every 4000 -> 2000, warm-up 2500 steps from lr 1e-10")
    assert derive(workers=4, images=2).note == (
        "scaling linear: 4 workers x 2 images = global batch 8; lr 1e-10 -> 4e-10 (loss sum adds a worker's "
        "2 images already: lr x 4 workers), iterations 100000 -> 12500, val_every 4000 -> 500, "
        "warm-up 625 steps from lr 1e-10")
    assert derive("none", workers=2).note == (
        "scaling none: 2 workers x 1 image = global batch 2; lr 1e-10, iterations 100000, val_every 4000 as "
        "the params give them (a stage sees 2x the reference's images; train.scaling linear or sqrt keeps them)")


def test_asked_iterations_names_a_count_that_reaches_the_steps_trained():
    derived = derive(workers=4)
    assert derived.asked_iterations(30_000) == 120_000
    assert derive(workers=4, iterations=derived.asked_iterations(30_000)).iterations == 30_000


@pytest.mark.parametrize("loss", ["sum", "mean"])
@pytest.mark.parametrize("workers, images", [(2, 1), (2, 2), (1, 3)])
def test_the_derived_lr_makes_one_step_the_sum_of_the_batch_1_steps(loss, workers, images):
    """The rule's premise with the real loss: lr x (DDP's mean over the workers of each worker's
    gradient) is the params' lr x the sum of the B per-image gradients of batch-1 steps. Images
    of one size without void, so a mean loss weighs each image alike."""
    torch.manual_seed(0)
    net = nn.Conv2d(3, 4, 3, padding=1)
    batch = workers * images
    all_images = torch.randn(batch, 3, 6, 5)
    all_labels = torch.randint(0, 4, (batch, 6, 5))

    def gradient(x, y):
        net.zero_grad()
        loop.segmentation_loss(net(x), y, loss).backward()
        return net.weight.grad.clone()

    per_image = sum(gradient(all_images[i:i + 1], all_labels[i:i + 1]) for i in range(batch))
    shares = [slice(w * images, (w + 1) * images) for w in range(workers)]
    ddp_mean = sum(gradient(all_images[s], all_labels[s]) for s in shares) / workers
    derived = derive(workers=workers, images=images, loss=loss, lr=1.0)
    assert torch.allclose(derived.lr * ddp_mean, 1.0 * per_image, rtol=1e-5, atol=1e-6)


def test_warmup_factor_rises_by_equal_steps_from_start_to_one():
    factors = [scaling.warmup_factor(i, 4, 0.25) for i in range(1, 7)]
    assert factors == [0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0]
    assert scaling.warmup_factor(1, 0, 1.0) == 1.0


# --------------------------------------------------------------------------- the loop and the recipe

STAGES = {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 40}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    write_shards(root / "shards")
    return root


def linear_params(root, stages=STAGES, workers=4):
    return make_params(root, stages, workers=workers, optimizer="sgd", momentum=0.9, scaling="linear", val_every=8)


def batches():
    torch.manual_seed(1)
    while True:
        yield torch.randn(1, 3, 24, 32), torch.randint(0, 21, (1, 24, 32))


def group_lrs(worker):
    return [group["lr"] for group in worker.optimizer.param_groups]


def recording(worker, seen):
    """worker with train_step noting the rates each step runs at."""
    step = worker.train_step

    def train_step(images, labels):
        seen.append(group_lrs(worker))
        return step(images, labels)

    worker.train_step = train_step
    return worker


def test_the_stage_config_runs_with_the_derived_values(root):
    params = linear_params(root)
    config = loop.stage_config(params, "fcn32s", RANDOM)
    assert (config.lr, config.iterations, config.val_every) == (pytest.approx(4e-3), 10, 2)
    assert config.scaling == scaling.for_stage(params, "fcn32s")
    plain = loop.stage_config(make_params(root, STAGES, workers=4, val_every=8), "fcn32s", RANDOM)
    assert (plain.lr, plain.iterations, plain.val_every, plain.scaling.warmup_iterations) == (1e-3, 40, 8, 0)


def test_the_warm_up_ramps_every_groups_lr_linearly_and_resumes_on_the_line(root, tmp_path):
    """A tiny real network trained by loop.run: from the params' lr at step 1 up by equal steps,
    biases at twice the weights' rate throughout; a worker resumed from a checkpoint saved in
    the warm-up continues on the same line."""
    params = linear_params(root)
    config = loop.stage_config(params, "fcn32s", RANDOM)
    derived = config.scaling
    assert derived.warmup_iterations == 1250 and derived.lr == pytest.approx(4e-3)
    config = dataclasses.replace(config, iterations=5, val_every=5)
    seen, saved = [], tmp_path / "checkpoint"
    worker = recording(loop.StageWorker(config, "cpu"), seen)
    weights, biases = worker.full_lrs
    assert (weights, biases) == (pytest.approx(4e-3), pytest.approx(8e-3))
    loop.run(worker, batches(), lambda: [next(batches())], lambda row, write: write(saved))

    def expected(step):
        return 1e-3 + (4e-3 - 1e-3) * (step - 1) / 1250

    assert [w for w, _ in seen] == pytest.approx([expected(i) for i in range(1, 6)], rel=1e-9)
    assert [b for _, b in seen] == pytest.approx([2 * expected(i) for i in range(1, 6)], rel=1e-9)
    assert seen[0][0] == pytest.approx(1e-3, rel=1e-12)
    # The checkpoint's optimizer state holds step 5's rates; the resumed run sets its own.
    resumed_seen = []
    resumed = recording(loop.StageWorker(dataclasses.replace(config, iterations=8), "cpu", checkpoint_dir=saved),
                        resumed_seen)
    assert resumed.start == 5
    assert resumed.full_lrs == pytest.approx([4e-3, 8e-3])
    loop.run(resumed, batches(), lambda: [next(batches())], lambda row, write: None)
    assert [w for w, _ in resumed_seen] == pytest.approx([expected(i) for i in range(6, 9)], rel=1e-9)
    # The end of the ramp: its last step just under the full rate, then the full rate.
    resumed.warm_up(1250)
    assert group_lrs(resumed) == pytest.approx([expected(1250), 2 * expected(1250)], rel=1e-9)
    resumed.warm_up(1251)
    assert group_lrs(resumed) == pytest.approx([4e-3, 8e-3], rel=1e-12)


def test_adam_runs_with_the_sqrt_rules_lr_and_betas(root):
    params = make_params(root, STAGES, workers=2, optimizer="adam", momentum=0.9, scaling="sqrt", val_every=8,
                         batch_mode="crops", batch_size=2, warmup_images=0)
    config = loop.stage_config(params, "fcn32s", RANDOM)
    assert (config.lr, config.iterations, config.val_every, config.momentum) == (
        pytest.approx(2e-3), 10, 2, pytest.approx(0.6))
    worker = loop.StageWorker(config, "cpu")
    assert isinstance(worker.optimizer, torch.optim.Adam)
    assert {tuple(round(b, 12) for b in group["betas"]) for group in worker.optimizer.param_groups} == {(0.6, 0.996)}
    assert group_lrs(worker) == pytest.approx([2e-3, 4e-3])
    sgd = loop.StageWorker(loop.stage_config(linear_params(root), "fcn32s", RANDOM), "cpu")
    assert {group["momentum"] for group in sgd.optimizer.param_groups} == {0.9}


def test_without_a_warm_up_every_step_runs_at_the_full_rate(root):
    config = loop.stage_config(make_params(root, STAGES, workers=4, optimizer="sgd", val_every=2), "fcn32s", RANDOM)
    config = dataclasses.replace(config, iterations=3)
    seen = []
    worker = recording(loop.StageWorker(config, "cpu"), seen)
    loop.run(worker, batches(), lambda: [next(batches())], lambda row, write: None)
    assert seen == [[1e-3, 2e-3]] * 3


def test_the_rule_names_the_run_and_the_iteration_count_still_continues_it(root):
    none = make_params(root, STAGES, workers=4, optimizer="sgd", momentum=0.9, val_every=8)
    linear = linear_params(root)
    assert recipe.run_name(linear, "fcn32s", RANDOM, root) != recipe.run_name(none, "fcn32s", RANDOM, root)
    longer = linear_params(root, {"fcn32s": {**STAGES["fcn32s"], "iterations": 80}})
    assert scaling.for_stage(longer, "fcn32s").iterations == 20
    assert recipe.run_name(longer, "fcn32s", RANDOM, root) == recipe.run_name(linear, "fcn32s", RANDOM, root)


def test_the_mlflow_params_record_the_rule_and_what_it_derived(root):
    logged = recipe.stage_params(linear_params(root), "fcn32s", RANDOM)
    assert logged["train.scaling"] == "linear"
    assert {k: v for k, v in logged.items() if k.startswith("derived.")} == {
        "derived.global_batch": "4", "derived.lr": "0.004", "derived.iterations": "10",
        "derived.val_every": "2", "derived.warmup_iterations": "1250", "derived.momentum": "0.9",
        "derived.beta2": "0.999", "derived.lr_step_iteration": "0"}
    assert logged["stage.lr"] == "0.001" and logged["stage.iterations"] == "40"


def test_none_keeps_the_full_profiles_run_name(monkeypatch):
    """The full profile (params.yaml) says none: its run name is the one the recipe gave before
    train.scaling was a result param; linear names another run."""
    full = load_params(PROJECT_ROOT / "params.yaml")
    assert full.train.scaling == "none"
    name = recipe.run_name(full, "fcn32s", RANDOM, PROJECT_ROOT)
    linear = dataclasses.replace(full, train=dataclasses.replace(full.train, scaling="linear"))
    assert recipe.run_name(linear, "fcn32s", RANDOM, PROJECT_ROOT) != name
    monkeypatch.setattr(recipe, "RESULT_PARAMS", tuple(k for k in recipe.RESULT_PARAMS if k != "train.scaling"))
    assert recipe.run_name(full, "fcn32s", RANDOM, PROJECT_ROOT) == name


def test_each_rule_names_a_run_of_its_own():
    full = load_params(PROJECT_ROOT / "params.yaml")
    adam = dataclasses.replace(full.train, optimizer="adam", momentum=0.9)
    names = {recipe.run_name(dataclasses.replace(full, train=dataclasses.replace(adam, scaling=rule)), "fcn32s",
                             RANDOM, PROJECT_ROOT) for rule in ("none", "sqrt")}
    assert len(names) == 2


def test_the_warm_up_names_the_run_and_its_default_keeps_the_name_it_had(monkeypatch):
    full = load_params(PROJECT_ROOT / "params.yaml")
    assert full.train.warmup_images == 5000
    name = recipe.run_name(full, "fcn32s", RANDOM, PROJECT_ROOT)
    short = dataclasses.replace(full, train=dataclasses.replace(full.train, warmup_images=100))
    assert recipe.run_name(short, "fcn32s", RANDOM, PROJECT_ROOT) != name
    monkeypatch.setattr(recipe, "RESULT_PARAMS",
                        tuple(k for k in recipe.RESULT_PARAMS if k != "train.warmup_images"))
    assert recipe.run_name(full, "fcn32s", RANDOM, PROJECT_ROOT) == name


def test_a_negative_warm_up_is_refused_naming_the_key():
    with pytest.raises(ParamsError, match=r"train\.warmup_images = -1: must be >= 0"):
        parse_params({"train": {"warmup_images": -1}})


@pytest.mark.parametrize("value", ["quadratic", "Linear", 2, None])
def test_a_bad_rule_is_refused_naming_the_key(tmp_path, value):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"scaling": value}}))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    assert "train.scaling" in message and "'none', 'linear'" in message and str(path) in message


def test_linear_with_adam_and_sqrt_with_sgd_are_refused_naming_the_key():
    with pytest.raises(ParamsError, match=r"train\.scaling = 'linear': the linear rule .* is for SGD; .* use sqrt"):
        parse_params({"train": {"scaling": "linear", "optimizer": "adam"}})
    with pytest.raises(ParamsError, match=r"train\.scaling = 'sqrt': the square-root rule .* is for Adam; .* use linear"):
        parse_params({"train": {"scaling": "sqrt", "optimizer": "sgd"}})
    assert parse_params({"train": {"scaling": "none", "optimizer": "adam"}}).train.scaling == "none"
    assert parse_params({"train": {"scaling": "sqrt", "optimizer": "adam", "momentum": 0.9}}).train.scaling == "sqrt"


def test_sqrt_refuses_a_batch_that_takes_beta1_to_zero_naming_the_key():
    knobs = {"scaling": "sqrt", "optimizer": "adam", "momentum": 0.9}
    assert parse_params({"train": knobs, "ray": {"num_workers": 9}}).ray.num_workers == 9   # beta1 0.1
    with pytest.raises(ParamsError, match=r"train\.momentum = 0\.9: .* global batch .* = 10, .* above 0\.9\b"):
        parse_params({"train": knobs, "ray": {"num_workers": 10}})
    with pytest.raises(ParamsError, match=r"= 12, "):
        parse_params({"train": {**knobs, "batch_mode": "crops", "batch_size": 4}, "ray": {"num_workers": 3}})


# --------------------------------------------------------------------------- the lr step

def test_the_lr_step_is_placed_after_its_images_under_every_rule():
    # sqrt, 4 images a step: 1,800 images are 450 steps, so step 451 is the first at a tenth.
    sqrt = scaling.derive("sqrt", workers=1, images_per_worker=4, loss="mean", lr=1e-4, iterations=2400,
                          val_every=800, warmup_images=100, momentum=0.9, lr_step_at=1800)
    assert (sqrt.iterations, sqrt.lr_step_iteration) == (600, 451)
    assert sqrt.note.endswith(", lr x 0.1 from step 451")
    # A count that is not a whole number of steps rounds up, as iterations do.
    assert derive(workers=4, images=2, loss="mean", lr_step_at=1001).lr_step_iteration == 127
    # none counts steps, as its iterations: the step after the 30th.
    none = derive("none", workers=4, lr_step_at=30)
    assert none.lr_step_iteration == 31 and none.note.endswith("from step 31")
    assert derive(lr_step_at=None).lr_step_iteration == 0 and "lr x" not in derive().note


def test_from_its_step_on_every_group_trains_at_a_tenth_and_a_resumed_run_stays_there(root, tmp_path):
    stages = {"fcn32s": {**STAGES["fcn32s"], "lr_step_at": 3}}
    config = loop.stage_config(make_params(root, stages, workers=1, optimizer="sgd", val_every=4), "fcn32s", RANDOM)
    assert config.scaling.lr_step_iteration == 4
    config = dataclasses.replace(config, iterations=5, val_every=5)
    seen, saved = [], tmp_path / "checkpoint"
    worker = recording(loop.StageWorker(config, "cpu"), seen)
    loop.run(worker, batches(), lambda: [next(batches())], lambda row, write: write(saved))
    # Biases keep twice the weights' rate on both sides of the step.
    assert sum(seen, []) == pytest.approx([1e-3, 2e-3] * 3 + [1e-4, 2e-4] * 2, rel=1e-12)
    resumed_seen = []
    resumed = recording(loop.StageWorker(dataclasses.replace(config, iterations=7), "cpu", checkpoint_dir=saved),
                        resumed_seen)
    loop.run(resumed, batches(), lambda: [next(batches())], lambda row, write: None)
    assert sum(resumed_seen, []) == pytest.approx([1e-4, 2e-4] * 2, rel=1e-12)


def test_the_lr_step_names_its_own_run_and_a_stage_without_one_keeps_its_name(root, monkeypatch):
    plain = make_params(root, STAGES, workers=1, optimizer="sgd", val_every=4)
    stepped = make_params(root, {"fcn32s": {**STAGES["fcn32s"], "lr_step_at": 30}}, workers=1, optimizer="sgd",
                          val_every=4)
    name = recipe.run_name(plain, "fcn32s", RANDOM, root)
    assert recipe.run_name(stepped, "fcn32s", RANDOM, root) != name
    assert recipe.stage_params(stepped, "fcn32s")["derived.lr_step_iteration"] == "31"
    # Without an lr step the name is the one it had before the key existed.
    assert recipe.result_params(plain, "fcn32s")["train.stages.fcn32s.lr_step_at"] is None
    before = recipe.result_params
    monkeypatch.setattr(recipe, "result_params", lambda params, stage: {
        k: v for k, v in before(params, stage).items() if not k.endswith(".lr_step_at")})
    assert recipe.run_name(plain, "fcn32s", RANDOM, root) == name


def test_an_lr_step_before_the_first_image_is_refused():
    with pytest.raises(ParamsError, match=r"lr_step_at = 0: must be >= 1"):
        parse_params({"train": {"stages": {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 10,
                                                      "lr_step_at": 0}}}})
