"""Infinite params are refused; a non-finite training loss stops the stage (or is skipped, when allowed).

The loop tests run pipelines.train.loop without Ray on the tiny network of test_train: a
learning rate raised to 1e30 after the first checkpoint blows the weights up, a NaN
image gives one bad batch. The Ray test trains a stage whose learning rate is 1e30
from the start on two workers.
"""
import math
import subprocess
import sys

import pytest
import torch

from pipelines.core.errors import StageError
from pipelines.core.params import PROJECT_ROOT, ParamsError, load_params
from pipelines.train import loop, trainer
from support.training import make_params, write_shards
from support.workers import ITERATIONS, VAL_EVERY, tiny_worker





def batches(worker, *, blow_up_at=None, nan_image_at=None):
    """Random (image, label) batches; before iteration `blow_up_at` the learning rate becomes 1e30,
    at iteration `nan_image_at` the image is all NaN."""
    generator = torch.Generator().manual_seed(0)
    for iteration in range(1, 10_000):
        if iteration == blow_up_at:
            for group in worker.optimizer.param_groups:
                group["lr"] = 1e30
        image = torch.randn(1, 3, 24, 32, generator=generator)
        if iteration == nan_image_at:
            image = torch.full_like(image, math.nan)
        yield image, torch.randint(0, 3, (1, 24, 32), generator=generator)


def val_batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(1, 3, 24, 32, generator=generator), torch.randint(0, 3, (1, 24, 32), generator=generator))]


def test_infinite_params_are_refused_naming_the_key(tmp_path):
    for text in ("lr: .inf", "lr: -.inf", "lr: .nan"):
        path = tmp_path / "params.yaml"
        path.write_text(f"train:\n  stages:\n    fcn32s: {{init: imagenet, iterations: 10, {text}}}\n")
        with pytest.raises(ParamsError, match=r"train\.stages\.fcn32s\.lr"):
            load_params(path)
    # The stage's exit status for it is the params error's.
    done = subprocess.run([sys.executable, "-m", "pipelines.stages.train", "--stage", "fcn32s", "--params", str(path)],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "train.stages.fcn32s.lr = nan: expected a finite number" in done.stderr.splitlines()[-1]


def test_a_non_finite_loss_stops_the_loop_naming_iteration_and_last_checkpoint(tmp_path):
    worker = tiny_worker(tmp_path)
    reported = []
    with pytest.raises(loop.NonFiniteLoss) as stop:
        loop.run(worker, batches(worker, blow_up_at=3), val_batches, lambda row, write: reported.append(row))
    # Step 3 made the weights huge; the loss of iteration 4 is no number.
    assert (stop.value.iteration, stop.value.last_checkpoint, stop.value.skipped) == (4, 2, 1)
    assert not math.isfinite(stop.value.loss)
    assert "at iteration 4" in str(stop.value) and "checkpoint is the one of iteration 2" in str(stop.value)
    # Nothing validated or checkpointed after the bad step.
    assert [row["iteration"] for row in reported] == [2]


def test_allowed_non_finite_steps_are_skipped_without_an_update(tmp_path):
    worker = tiny_worker(tmp_path, max_nonfinite_steps=1)
    reported, saved = [], []
    before = {}

    def report(row, write):
        reported.append(row)
        saved.append(tmp_path / f"checkpoint-{row['iteration']}")
        write(saved[-1])

    data = batches(worker, nan_image_at=3)

    def watched():
        for iteration, batch in enumerate(data, 1):
            if iteration == 3:
                before.update({n: p.detach().clone() for n, p in worker.net.named_parameters()})
            yield batch
            if iteration == 3:
                # The NaN batch changed no weight.
                assert all(torch.equal(p, before[n]) for n, p in worker.net.named_parameters())

    loop.run(worker, watched(), val_batches, report)
    assert [row["iteration"] for row in reported] == [2, 4, 6]
    assert all(math.isfinite(row["loss"]) for row in reported)
    assert worker.nonfinite_steps == 1
    # The count is part of the run: a resumed attempt starts from it.
    resumed = loop.StageWorker(worker.config, "cpu", checkpoint_dir=saved[-1])
    assert (resumed.start, resumed.nonfinite_steps) == (ITERATIONS, 1)

    # Without the allowance the same batch stops the run at iteration 3.
    strict = tiny_worker(tmp_path)
    with pytest.raises(loop.NonFiniteLoss) as stop:
        loop.run(strict, batches(strict, nan_image_at=3), val_batches, lambda row, write: None)
    assert (stop.value.iteration, stop.value.last_checkpoint) == (3, 2)


def test_a_stage_whose_loss_goes_nan_stops_once_fails_its_run_and_writes_nothing(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "shards")
    stages = {"fcn32s": {"init": "imagenet", "lr": 1e30, "iterations": ITERATIONS}}
    params = make_params(tmp_path, stages, optimizer="sgd", momentum=0.9, val_every=VAL_EVERY, max_failures=2)
    with pytest.raises(StageError) as err:
        trainer.run_stage(params, "fcn32s", tmp_path, run_name="nan", trace_dir=str(tmp_path / "trace"))
    message = str(err.value)
    assert "the training loss is nan at iteration 2" in message, message
    assert "no checkpoint was written before it" in message
    assert f"Nothing was written to {tmp_path / 'models' / 'fcn32s'}" in message
    # One attempt, stopped at iteration 2 on both workers: no retry trained on from a checkpoint.
    log = (tmp_path / "trace" / "iterations.log").read_text().splitlines()
    assert log == ["start 1 0", "1 1", "1 2"]
    assert not (tmp_path / "models").exists() and not (tmp_path / "reports").exists()

    from mlflow import MlflowClient

    from pipelines.track import store

    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    runs = client.search_runs([client.get_experiment_by_name(params.mlflow.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
