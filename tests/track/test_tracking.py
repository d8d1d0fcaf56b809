"""MLflow tracking of training stages, against the real SQLite store in a temp project.

One module fixture trains FCN-32s twice under the same Ray run name (4 iterations,
then 6) in a git repository holding the tiny shards of test_train; the tests read
what the first run recorded and how the second continued it. The rest trains nothing.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fcn_models.metrics import SCORE_KEYS
from fcn_models.palette import overlay
from pipelines.core.params import parse_params
from pipelines.data.shards import decode_sample
from pipelines.track import metrics_log, provenance, stage_runs, store
from pipelines.train import recipe, trainer
from support.training import N_TRAIN, N_VAL, SIZES, make_params, read_history, write_shards

SCORE_AND_LOSS = ("loss", *SCORE_KEYS)
RANDOM_INIT = recipe.StageInit(source="random", path=None, note="random (test)")
GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def git(repo, *args):
    result = subprocess.run(["git", *args], cwd=repo, env={**os.environ, **GIT_ENV},
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


def committed_repo(path):
    """A git repository at path whose one commit ignores everything else in it."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q")
    (path / ".gitignore").write_text("*\n!.gitignore\n")
    git(path, "add", ".gitignore")
    git(path, "-c", "commit.gpgsign=false", "commit", "-q", "-m", "project")
    return git(path, "rev-parse", "HEAD")


def dvc_md5(directory, scratch):
    """The md5 `dvc add` records for a copy of directory."""
    repo = scratch / "dvc-repo"
    shutil.copytree(directory, repo / "data")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for args in (("init", "--no-scm", "-q"), ("add", "-q", "data")):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, check=True, capture_output=True)
    return yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]


def with_mlflow(params, **knobs):
    return dataclasses.replace(params, mlflow=dataclasses.replace(params.mlflow, **knobs))


def experiment_runs(root, params):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    return client, client.search_runs([experiment.experiment_id])


def metric_rows(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


# --------------------------------------------------------------------------- provenance, no Ray


def test_git_state_reads_the_commit_and_notes_a_dirty_tree(tmp_path):
    head = committed_repo(tmp_path / "repo")
    assert provenance.git_state(tmp_path / "repo") == (head, False)
    (tmp_path / "repo" / ".gitignore").write_text("*\n")
    assert provenance.git_state(tmp_path / "repo") == (head, True)
    (tmp_path / "plain").mkdir()
    assert provenance.git_state(tmp_path / "plain") == ("unknown", None)


def test_shards_hash_is_dvcs_from_the_lock_while_it_still_fits(tmp_path):
    shards = tmp_path / "data" / "shards"
    write_shards(shards)
    expected = dvc_md5(shards, tmp_path)
    assert expected.endswith(".dir")
    assert provenance.shards_hash(shards, tmp_path) == (expected, "computed")

    files = [p for p in shards.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    locked = "0123456789abcdef0123456789abcdef.dir"  # not the content's: proves the lock was read

    def write_lock(nfiles, size):
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"preprocess": {
            "cmd": "python -m pipelines.stages.preprocess",
            "outs": [{"path": "data/shards", "hash": "md5", "md5": locked, "size": size, "nfiles": nfiles}]}}}))

    write_lock(len(files), size)
    assert provenance.shards_hash(shards, tmp_path) == (locked, "dvc.lock")
    # Shards changed outside DVC since the lock was written: the lock no longer describes them.
    write_lock(len(files), size + 1)
    assert provenance.shards_hash(shards, tmp_path) == (expected, "computed")


def test_a_temp_folder_left_by_a_killed_preprocess_does_not_change_the_shards_hash(tmp_path):
    shards = tmp_path / "data" / "shards"
    write_shards(shards)
    clean = dvc_md5(shards, tmp_path)
    files = [p for p in shards.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    # What a preprocess killed before its swap leaves: a half-written split beside the shards.
    stale = shards / ".train.tmp-12345"
    stale.mkdir()
    shutil.copy(shards / "train" / "part-00000.parquet", stale / "part-00000.parquet")
    assert provenance.shards_hash(shards, tmp_path) == (clean, "computed")
    # dvc.lock, written before the killed run, still describes the shards.
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"preprocess": {
        "outs": [{"path": "data/shards", "hash": "md5", "md5": clean, "size": size, "nfiles": len(files)}]}}}))
    assert provenance.shards_hash(shards, tmp_path) == (clean, "dvc.lock")
    # A split's digest is DVC's md5 of that split's directory.
    (tmp_path / "split").mkdir()
    assert provenance.compute_shards_hash(shards, "train") == dvc_md5(shards / "train", tmp_path / "split")


def test_same_ray_run_reopens_its_mlflow_run_and_another_name_opens_a_new_one(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "shards")
    stages = {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 4}}
    params = make_params(tmp_path, stages)
    storage = str(tmp_path / "ray_results")
    first = stage_runs.open_stage_run(params, "fcn32s", tmp_path, "one", storage, RANDOM_INIT, recipe.stage_params(params, "fcn32s", RANDOM_INIT))
    assert not first.resumed
    # The embedded default: SQLite in the project, artifacts beside it, both absolute.
    assert first.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and (tmp_path / "mlflow.db").is_file()
    stage_runs.end_stage_run(first, "FAILED")

    longer = make_params(tmp_path, {"fcn32s": {**stages["fcn32s"], "iterations": 8}})
    again = stage_runs.open_stage_run(longer, "fcn32s", tmp_path, "one", storage, RANDOM_INIT, recipe.stage_params(longer, "fcn32s", RANDOM_INIT))
    other = stage_runs.open_stage_run(params, "fcn32s", tmp_path, "two", storage, RANDOM_INIT, recipe.stage_params(params, "fcn32s", RANDOM_INIT))
    assert again.run_id == first.run_id and again.resumed
    assert other.run_id != first.run_id and not other.resumed

    client, runs = experiment_runs(tmp_path, params)
    by_id = {r.info.run_id: r for r in runs}
    assert len(runs) == 2
    reopened = by_id[first.run_id]
    assert reopened.info.status == "RUNNING" and reopened.info.run_name == "fcn32s-one"
    assert reopened.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    # Params are write-once in MLflow: the first value stays, the current one is a tag.
    assert reopened.data.params["stage.iterations"] == "4"
    assert reopened.data.tags["fcn.param.stage.iterations"] == "8"
    assert "stage.iterations 4 -> 8" in capsys.readouterr().out
    assert {r.data.tags["fcn.ray_run"] for r in runs} == {"one", "two"}


def test_a_stage_from_an_earlier_stage_is_nested_under_the_run_that_trained_its_weights(tmp_path, monkeypatch):
    from fcn_models.checkpoint import save_checkpoint
    from fcn_models.fcn import build_fcn

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "shards")
    params = make_params(tmp_path, {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 4},
                                    "fcn16s": {"init": "fcn32s", "lr": 1e-3, "iterations": 4}})
    storage = str(tmp_path / "ray_results")
    first = stage_runs.open_stage_run(params, "fcn32s", tmp_path, "a", storage, RANDOM_INIT, recipe.stage_params(params, "fcn32s", RANDOM_INIT))
    save_checkpoint(tmp_path / "models" / "fcn32s", build_fcn("fcn32s", width=0.0625),
                    {"stage": "fcn32s", "mlflow_run_id": first.run_id})
    init = recipe.resolve_init(params, "fcn16s")
    second = stage_runs.open_stage_run(params, "fcn16s", tmp_path, "b", storage, init, recipe.stage_params(params, "fcn16s", init))
    client = second.client()
    run = client.get_run(second.run_id)
    assert run.data.tags["mlflow.parentRunId"] == first.run_id
    # stage.init is where the weights really started: FCN-32s's checkpoint; for FCN-32s, random weights.
    assert run.data.params["stage.init"] == "fcn32s"
    assert client.get_run(first.run_id).data.params["stage.init"] == "random"
    assert "mlflow.parentRunId" not in client.get_run(first.run_id).data.tags
    # The shards as dataset inputs: each split with its DVC md5 and rows.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["train", "val"]
    for split, rows in (("train", N_TRAIN), ("val", N_VAL)):
        dataset = inputs[split].dataset
        assert dataset.digest == provenance.compute_shards_hash(tmp_path / "shards", split)
        assert json.loads(dataset.profile)["num_rows"] == rows
        assert json.loads(dataset.source)["uri"] == (tmp_path / "shards" / split).as_uri()
        assert {t.key: t.value for t in inputs[split].tags}["mlflow.data.context"] == \
            {"train": "training", "val": "validation"}[split]
    # A checkpoint whose run is not in this store: no parent, no error.
    save_checkpoint(tmp_path / "models" / "fcn32s", build_fcn("fcn32s", width=0.0625),
                    {"stage": "fcn32s", "mlflow_run_id": "0" * 32})
    third = stage_runs.open_stage_run(params, "fcn16s", tmp_path, "c", storage, recipe.resolve_init(params, "fcn16s"), recipe.stage_params(params, "fcn16s", recipe.resolve_init(params, "fcn16s")))
    assert "mlflow.parentRunId" not in client.get_run(third.run_id).data.tags
    for stage_run in (first, second, third):
        stage_runs.end_stage_run(stage_run, "FAILED")


def test_a_store_that_cannot_be_opened_stops_the_stage_before_training(tmp_path):
    write_shards(tmp_path / "shards")
    (tmp_path / "a-file").write_text("")  # where the store's directory should be
    params = with_mlflow(make_params(tmp_path, {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 4}}),
                         tracking_uri=f"sqlite:///{tmp_path}/a-file/mlflow.db")
    with pytest.raises(recipe.StageError, match="cannot open the MLflow tracking store sqlite:///.*a-file"):
        trainer.run_stage(params, "fcn32s", tmp_path, run_name="never")
    assert not (tmp_path / "ray_results" / "never").exists()


def test_new_starting_weights_are_a_new_ray_run_and_so_a_new_mlflow_run(tmp_path):
    """An earlier stage retrained to the same scores writes the same meta.json, other weights."""
    import torch

    from fcn_models.checkpoint import save_checkpoint
    from fcn_models.fcn import build_fcn

    write_shards(tmp_path / "shards")
    params = make_params(tmp_path, {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 4},
                                    "fcn16s": {"init": "fcn32s", "lr": 1e-3, "iterations": 4}})
    names = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / "models" / "fcn32s", build_fcn("fcn32s", width=0.0625), {"stage": "fcn32s"})
        init = recipe.resolve_init(params, "fcn16s")
        names.append(recipe.run_name(params, "fcn16s", init, tmp_path))
    assert names[0] != names[1]


# --------------------------------------------------------------------------- a stage on Ray, run twice


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, ray_cluster):
    """FCN-32s for 4 iterations (2 workers), then the same Ray run to 6 (1 worker)."""
    root = tmp_path_factory.mktemp("tracked")
    commit = committed_repo(root)
    write_shards(root / "shards")
    expected_md5 = dvc_md5(root / "shards", tmp_path_factory.mktemp("dvc"))
    params = with_mlflow(make_params(root, {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 4}}),
                         val_images_logged=2)
    longer = with_mlflow(make_params(root, {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 6}},
                                     workers=1, models_dir=str(root / "models-longer"),
                                     reports_dir=str(root / "reports-longer")), val_images_logged=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        metrics = trainer.run_stage(params, "fcn32s", root, run_name="tracked")
        client, runs = experiment_runs(root, params)
        first = {"runs": runs, "metrics": {k: metric_rows(client, runs[0].info.run_id, k)
                                           for k in (*SCORE_AND_LOSS, metrics_log.TRAIN_LOSS_KEY)}}
        trainer.run_stage(longer, "fcn32s", root, run_name="tracked")
        _, after = experiment_runs(root, params)
    return {"root": root, "params": params, "metrics": metrics, "commit": commit, "md5": expected_md5,
            "client": client, "first": first, "after": after}


def test_a_stage_is_one_finished_run_with_its_params_and_provenance(tracked):
    root, runs = tracked["root"], tracked["first"]["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "fcn32s-tracked"
    params = run.data.params
    # ImageNet weights were asked for (train.stages.fcn32s.init) but are absent: random, as the param says.
    assert params["stage.lr"] == "0.001" and params["stage.iterations"] == "4" and params["stage.init"] == "random"
    assert params["train.loss"] == "mean" and params["train.val_every"] == "2"
    assert params["model.width"] == "0.0625" and params["ray.num_workers"] == "2"
    # Exactly what decides the result (pipelines.train.recipe): no knob of how the stage ran.
    assert set(params) == set(recipe.stage_params(tracked["params"], "fcn32s"))
    # The best weights' sha256, which a registered version of them carries too.
    from pipelines.core.files import file_sha256

    assert run.data.tags["weights_sha256"] == file_sha256(root / "models" / "fcn32s" / "model.pt")
    assert "ray.cpus_per_worker" not in params and "data.shards_dir" not in params
    # The checkpoint names its run: evaluate and register find it there.
    from fcn_models.checkpoint import read_meta

    assert read_meta(root / "models" / "fcn32s")["mlflow_run_id"] == run.info.run_id
    tags = run.data.tags
    assert tags["fcn.stage"] == "fcn32s" and tags["fcn.ray_run"] == "tracked"
    assert tags["fcn.init"] == tracked["metrics"]["init"] and tags["fcn.init"].startswith("random (")
    assert tags["mlflow.source.git.commit"] == tracked["commit"] and tags["fcn.git_dirty"] == "false"
    assert tags["fcn.shards_md5"] == tracked["md5"] and tags["fcn.shards_md5_from"] == "computed"
    assert (root / "mlflow.db").is_file()


def test_metrics_by_iteration_are_the_history(tracked):
    root, logged = tracked["root"], tracked["first"]["metrics"]
    history = read_history(root / "reports" / "fcn32s" / "history.csv")
    assert [row["iteration"] for row in history] == [2, 4]
    for key in SCORE_AND_LOSS:
        assert logged[key] == [(int(row["iteration"]), pytest.approx(row[key], rel=1e-12)) for row in history], key
    # The training loss every log_every (2) iterations, once each.
    assert [step for step, _ in logged[metrics_log.TRAIN_LOSS_KEY]] == [2, 4]
    assert all(value > 0 for _, value in logged[metrics_log.TRAIN_LOSS_KEY])


def test_artifacts_are_the_plots_val_images_and_outputs(tracked):
    root, run = tracked["root"], tracked["first"]["runs"][0]
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(root / "mlartifacts")
    for name in ("plots/confusion_matrix.png", "plots/per_class_iu.png"):
        with Image.open(artifacts / name) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) > 200
    # The second run of the same run name logged over them: the stage's latest outputs.
    latest = json.loads((root / "reports-longer" / "fcn32s" / "metrics.json").read_text())
    assert latest["iterations"] == 6
    assert json.loads((artifacts / "outputs" / "metrics.json").read_text()) == latest

    # The first two val rows: image | prediction | truth, the truth drawn in the VOC colours.
    import pyarrow.parquet as pq

    rows = pq.read_table(root / "shards" / "val").to_pylist()[:2]
    assert sorted(p.name for p in (artifacts / "val_images").iterdir()) == sorted(f"{r['id']}.png" for r in rows)
    for row, (height, width) in zip(rows, SIZES):
        image, label = decode_sample(row["id"], row["image"], row["label"])
        panel = np.asarray(Image.open(artifacts / "val_images" / f"{row['id']}.png").convert("RGB"))
        assert panel.shape == (height, 3 * width + 8, 3)
        assert np.array_equal(panel[:, :width], image)
        truth = panel[:, 2 * width + 8:]
        assert np.array_equal(truth, overlay(image, label))
        assert not np.array_equal(truth, image)  # an object is in every label


def test_same_run_name_continues_the_same_run(tracked):
    root, first, after = tracked["root"], tracked["first"]["runs"][0], tracked["after"]
    assert [r.info.run_id for r in after] == [first.info.run_id]
    run = after[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["stage.iterations"] == "4" and run.data.tags["fcn.param.stage.iterations"] == "6"
    history = read_history(root / "reports-longer" / "fcn32s" / "history.csv")
    assert [row["iteration"] for row in history] == [2, 4, 6]
    client = tracked["client"]
    for key in SCORE_AND_LOSS:
        logged = metric_rows(client, run.info.run_id, key)
        assert logged[:2] == tracked["first"]["metrics"][key]
        assert logged == [(int(row["iteration"]), pytest.approx(row[key], rel=1e-12)) for row in history], key
    assert [step for step, _ in metric_rows(client, run.info.run_id, metrics_log.TRAIN_LOSS_KEY)] == [2, 4, 6]
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert read_history(artifacts / "outputs" / "history.csv") == history


def test_a_stage_that_fails_ends_its_run_failed(tmp_path, ray_cluster, monkeypatch):
    from pipelines.data.shards import ShardError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "shards")
    shutil.rmtree(tmp_path / "shards" / "val")
    params = make_params(tmp_path, {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 4}})
    with pytest.raises(ShardError, match="val"):
        trainer.run_stage(params, "fcn32s", tmp_path, run_name="broken")
    _, runs = experiment_runs(tmp_path, params)
    assert [(r.data.tags["fcn.ray_run"], r.info.status) for r in runs] == [("broken", "FAILED")]
    assert runs[0].info.end_time is not None


def test_the_store_is_absolute_for_workers_that_run_elsewhere(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = make_params(tmp_path, {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 4}})
    assert store.tracking_uri(params) == f"sqlite:///{tmp_path}/mlflow.db"
    # A relative SQLite path in a params file is taken from its directory, as every params path.
    relative = parse_params({"mlflow": {"tracking_uri": "sqlite:///store/runs.db"}}, "test", root=tmp_path)
    assert store.tracking_uri(relative) == f"sqlite:///{tmp_path}/store/runs.db"
    assert store.tracking_uri(with_mlflow(params, tracking_uri="http://127.0.0.1:5000")) == \
        "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert store.tracking_uri(params) == "http://127.0.0.1:5001"
    # A relative SQLite URI in the environment: from where it was set, this process's directory.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    monkeypatch.chdir(tmp_path)
    assert store.tracking_uri(params) == f"sqlite:///{tmp_path}/env.db"


def test_store_is_params_then_environment_then_the_projects_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = parse_params({}, "test params", root=tmp_path)
    assert store.tracking_uri(default) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert store.artifact_location(default) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert store.tracking_uri(default) == "http://127.0.0.1:5999"
    named = parse_params({"mlflow": {"tracking_uri": "http://127.0.0.1:5001"}}, "test params")
    assert store.tracking_uri(named) == "http://127.0.0.1:5001"
    # Opening one project's store leaves the next project its own.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    store.set_up(parse_params({}, "test params", root=tmp_path / "a"))
    other = parse_params({}, "test params", root=tmp_path / "b")
    assert store.tracking_uri(other) == f"sqlite:///{tmp_path.resolve() / 'b' / 'mlflow.db'}"
