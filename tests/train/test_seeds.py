"""`fcn seeds` without Ray: what each seed's run is given, what the command does around the
runs (spread file, MLflow parent and children, --evaluate), and its argument errors.

Training on Ray Train is the train stage's own (tests/train/test_train.py); here a stand-in
for pipelines.train.trainer.run_stage writes what a stage writes (a checkpoint naming its
MLflow run in the real SQLite store, metrics.json) and records the params it was given.
"""
import dataclasses
import json
from pathlib import Path

import pytest

from fcn_models.checkpoint import read_meta, save_checkpoint
from fcn_models.fcn import build_fcn
from fcn_models.metrics import SCORE_KEYS
from pipelines import cli
from pipelines.core.errors import StageError
from pipelines.core.files import file_sha256
from pipelines.track import seed_runs, seed_spread, stage_runs, store
from pipelines.train import recipe, seeds
from support.checkpoints import make_checkpoint
from support.stages import one_line, stage
from support.training import WIDTH, make_params, write_shards

STAGES = {"fcn16s": {"init": "imagenet", "lr": 1e-3, "iterations": 4},
          "fcn8s": {"init": "fcn16s", "lr": 1e-3, "iterations": 4}}


def project(root, **train_knobs):
    """Params for a project under root, with FCN-16s trained (its checkpoint in models/fcn16s)."""
    params = make_params(root, STAGES, **train_knobs)
    save_checkpoint(root / "models" / "fcn16s", build_fcn("fcn16s", width=WIDTH), {"stage": "fcn16s"})
    return params


def without_seed(params, like):
    """params with the three values a seed changes put back to those of `like`."""
    train = dataclasses.replace(params.train, seed=like.train.seed, models_dir=like.train.models_dir,
                                reports_dir=like.train.reports_dir)
    return dataclasses.replace(params, train=train)


class StandInStage:
    """In place of trainer.run_stage: records each call, writes the seed's checkpoint (a tiny
    FCN-8s whose training-time mean IU is 0.25 + seed / 200) naming a new MLflow run of the
    stage, and its metrics.json; `fail_seed` raises as a failed stage would."""

    def __init__(self, params, fail_seed=None):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=store.tracking_uri(params))
        self.experiment_id = store.set_up(params)
        self.fail_seed, self.calls, self.runs = fail_seed, [], {}

    def __call__(self, params, stage_name, root, init=None):
        self.calls.append({"params": params, "stage": stage_name, "root": root, "init": init})
        seed = params.train.seed
        if seed == self.fail_seed:
            raise StageError(f"seed {seed} stopped")
        run = self.client.create_run(self.experiment_id, run_name=f"{stage_name}-{seed}",
                                     tags={stage_runs.STAGE_TAG: stage_name})
        self.runs[seed] = run.info.run_id
        directory = Path(params.train.models_dir) / stage_name
        make_checkpoint(directory, seed, 0.5 + seed / 100, run.info.run_id)
        metrics = {**read_meta(directory)["val"], "best_iteration": 10, "iterations": 10, "init": init.note}
        (Path(params.train.reports_dir) / stage_name).mkdir(parents=True)
        (Path(params.train.reports_dir) / stage_name / "metrics.json").write_text(json.dumps(metrics))
        return metrics


# --------------------------------------------------------------------------- what each seed is given


def test_each_seed_gets_its_seed_and_own_directories_and_the_pipelines_start(tmp_path):
    params = project(tmp_path, seed=1)
    runs = seeds.plan(params, "fcn8s", [0, 1, 2])
    assert [run.seed for run in runs] == [0, 1, 2]
    for run in runs:
        assert run.params.train.seed == run.seed
        assert Path(run.params.train.models_dir) == tmp_path / "models" / "seeds" / f"seed-{run.seed}"
        assert Path(run.params.train.reports_dir) == tmp_path / "reports" / "seeds" / f"seed-{run.seed}"
        # Nothing else moves.
        assert without_seed(run.params, params) == params
        # The weights start from the pipeline's FCN-16s, not from one in the seed's directory.
        assert run.init == recipe.resolve_init(params, "fcn8s")
        assert Path(run.init.path) == tmp_path / "models" / "fcn16s" and run.init.source == "fcn16s"
    # The seed is a result param: each seed is a Ray run of its own, and the seed the pipeline
    # trains with is the pipeline's own run (the output directories are no result param).
    names = [recipe.run_name(run.params, "fcn8s", run.init, tmp_path) for run in runs]
    assert len(set(names)) == 3
    assert names[1] == recipe.run_name(params, "fcn8s", runs[1].init, tmp_path)


def test_an_earlier_stage_is_read_from_the_pipelines_models_dir_only(tmp_path):
    params = make_params(tmp_path, STAGES)
    # A seed's own FCN-16s does not count: every seed starts from the pipeline's.
    save_checkpoint(tmp_path / "models" / "seeds" / "seed-0" / "fcn16s", build_fcn("fcn16s", width=WIDTH),
                    {"stage": "fcn16s"})
    with pytest.raises(StageError) as caught:
        seeds.plan(params, "fcn8s", [0, 1])
    assert f"{tmp_path / 'models' / 'fcn16s'} holds none" in str(caught.value)
    assert "fcn train --stage fcn16s" in str(caught.value)
    with pytest.raises(StageError, match="unknown stage 'fcn99s'"):
        seeds.plan(params, "fcn99s", [0, 1])


# --------------------------------------------------------------------------- the command around the runs


def test_run_seeds_trains_each_seed_apart_and_writes_the_spread(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = project(tmp_path)
    init_sha = file_sha256(tmp_path / "models" / "fcn16s" / "model.pt")
    train = StandInStage(params)
    doc = seeds.run_seeds(params, "fcn8s", [0, 1, 2], tmp_path, train=train)

    assert [call["params"].train.seed for call in train.calls] == [0, 1, 2]
    assert all(call["stage"] == "fcn8s" and call["root"] == tmp_path for call in train.calls)
    assert all(Path(call["init"].path) == tmp_path / "models" / "fcn16s" for call in train.calls)
    # The pipeline's outputs are untouched: no models/fcn8s or reports/fcn8s, the same FCN-16s.
    assert not (tmp_path / "models" / "fcn8s").exists() and not (tmp_path / "reports" / "fcn8s").exists()
    assert file_sha256(tmp_path / "models" / "fcn16s" / "model.pt") == init_sha
    for seed in (0, 1, 2):
        assert (tmp_path / "models" / "seeds" / f"seed-{seed}" / "fcn8s" / "model.pt").is_file()
        assert (tmp_path / "reports" / "seeds" / f"seed-{seed}" / "fcn8s" / "metrics.json").is_file()

    # Training-time mean IU 0.25, 0.255, 0.26: mean 0.255, sample std 0.005.
    written = json.loads((tmp_path / "reports" / "seeds" / "fcn8s.json").read_text())
    assert written == json.loads(json.dumps(doc))
    assert written["source"] == "training" and written["seeds"] == [0, 1, 2]
    assert written["scores"]["mean_iu"]["mean"] == pytest.approx(0.255)
    assert written["scores"]["mean_iu"]["std"] == pytest.approx(0.005)
    assert [entry["training_run"] for entry in written["per_seed"]] == [train.runs[s] for s in (0, 1, 2)]
    assert written["params"] == seed_spread.result_params(recipe.stage_params(params, "fcn8s"))

    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    parent = client.get_run(written["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["seeds"] == "0,1,2"
    assert parent.data.metrics["mean_iu_mean"] == pytest.approx(0.255)
    assert parent.data.metrics["mean_iu_std"] == pytest.approx(0.005)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.data.tags[seed_runs.SEED_TAG]: c.data.tags[seed_runs.TRAINING_RUN_TAG] for c in children} == \
        {str(s): train.runs[s] for s in (0, 1, 2)}


def test_a_failed_seed_ends_the_parent_run_failed_and_writes_no_spread(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = project(tmp_path)
    train = StandInStage(params, fail_seed=1)
    with pytest.raises(StageError, match="seed 1 stopped"):
        seeds.run_seeds(params, "fcn8s", [0, 1, 2], tmp_path, train=train)
    assert [call["params"].train.seed for call in train.calls] == [0, 1]
    assert not (tmp_path / "reports" / "seeds" / "fcn8s.json").exists()
    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    parent, = client.search_runs([store.set_up(params)], filter_string="attributes.run_name = 'seeds-fcn8s'")
    assert parent.info.status == "FAILED"
    # Seed 0 finished before: its child is there.
    child, = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert child.data.tags[seed_runs.SEED_TAG] == "0"


def test_with_evaluate_the_spread_is_of_each_checkpoint_scored_on_all_of_val(tmp_path, monkeypatch):
    import torch
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "shards")
    params = project(tmp_path)
    train = StandInStage(params)
    doc = seeds.run_seeds(params, "fcn8s", [3, 4], tmp_path, evaluate=True, device=torch.device("cpu"), train=train)

    assert doc["source"] == "evaluate"
    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    scored = []
    for seed in (3, 4):
        checkpoint = tmp_path / "models" / "seeds" / f"seed-{seed}" / "fcn8s"
        reports = tmp_path / "reports" / "seeds" / f"seed-{seed}" / "fcn8s"
        entry = json.loads((reports / "evaluation.json").read_text())["fcn8s"]
        assert entry["images"] == 5 and entry["mlflow_run_id"] == train.runs[seed]
        assert entry["weights_sha256"] == file_sha256(checkpoint / "model.pt")
        # Evaluate's scores, not the training-time ones in the checkpoint; on the seed's training run too.
        assert entry["mean_iu"] != pytest.approx(read_meta(checkpoint)["val"]["mean_iu"])
        assert client.get_run(train.runs[seed]).data.metrics["eval/mean_iu"] == pytest.approx(entry["mean_iu"])
        scored.append(entry)
    for key in SCORE_KEYS:
        a, b = scored[0][key], scored[1][key]
        assert doc["scores"][key]["mean"] == pytest.approx((a + b) / 2)
        assert doc["scores"][key]["std"] == pytest.approx(abs(a - b) / 2 ** 0.5)


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv, message", [
    (["--stage", "fcn8s", "--seeds", "3"], "name at least two seeds"),
    (["--stage", "fcn8s", "--seeds", "1", "2", "1"], "1 named twice"),
    (["--stage", "fcn8s", "--seeds", "-1", "2"], "-1 is not a seed"),
    (["--stage", "fcn8s", "--seeds", "0", "1", "--device", "cpu"], "--device cpu: only --evaluate"),
    (["--stage", "fcn8s", "--seeds", "0", "1", "--params", "no/such/params.yaml"], "params file not found"),
])
def test_argument_errors_are_one_line_and_status_2(argv, message):
    status, err = stage(cli.main, "seeds", *argv)
    assert status == 2 and message in one_line(err) and one_line(err).startswith("seeds: ")


@pytest.mark.parametrize("argv", [["--stage", "fcn8s"], ["--stage", "fcn8s", "--seeds", "one", "two"],
                                  ["--seeds", "0", "1"]])
def test_arguments_argparse_refuses_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["seeds", *argv])
    assert caught.value.code == 2 and "usage: fcn seeds" in capsys.readouterr().err


def test_a_stage_that_cannot_start_fails_before_mlflow_or_any_output(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text(json.dumps({"train": {"stages": STAGES}}))
    status, err = stage(cli.main, "seeds", "--stage", "fcn8s", "--seeds", "0", "1",
                        "--params", str(tmp_path / "params.yaml"))
    assert status == 1
    assert f"{tmp_path / 'models' / 'fcn16s'} holds none" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
