"""A training stage as a Ray job, the way docs/CLUSTER.md runs it.

A head node is started with `ray start --head` on 127.0.0.1 (free ports, token
authentication, its own short --temp-dir), and a small project (code, .gitignore,
params.yaml with relative paths, tiny shards under data/shards) is submitted with
`ray job submit --working-dir <project> -- python -m pipelines.stages.train --stage fcn32s
--params <project>/params.yaml`. The job runs in Ray's copy of the working
directory; its outputs must land in the project. `ray stop` would stop every Ray
instance of the user on the machine, so the head is stopped through its own
`ray start --block` process instead (tests/e2e/ray_nodes.py).
"""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import torch
import yaml
from support.project_copy import copy_project
from support.ray_nodes import RAY, new_token, ray_env, short_temp_dir, start_head, stop_node

from fcn_models.checkpoint import load_checkpoint
from fcn_models.metrics import SCORE_KEYS
from pipelines.core.params import load_params
from support.checkpoints import checkpoint_mask, make_checkpoint
from support.training import WIDTH, read_history, write_shards

ITERATIONS, VAL_EVERY = 4, 2
# What the job needs of the project; .gitignore decides what the upload leaves out.
COPIED = ["pipelines", "fcn_models", ".gitignore"]
PARAMS = {
    "data": {"shards_dir": "data/shards"},
    "model": {"width": WIDTH, "imagenet_weights": None},
    "train": {"loss": "mean", "val_every": VAL_EVERY, "log_every": VAL_EVERY, "checkpoints_to_keep": 2,
              "stages": {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": ITERATIONS}}},
    "ray": {"num_workers": 2, "cpus_per_worker": 0.5, "data_cpus": 0.5, "max_failures": 0},
}


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 (tests/e2e/ray_nodes.py): its dashboard URL, the environment for the
    ray CLI, its temp dir and the HTTP headers its job API wants."""
    temp_dir = short_temp_dir("fcnray-")
    env = ray_env(new_token(temp_dir))
    head = start_head(temp_dir, env, num_cpus=4)
    try:
        yield {"url": head["url"], "env": env, "temp_dir": temp_dir, "headers": head["headers"]}
    finally:
        stop_node(head["process"])
        shutil.rmtree(temp_dir, ignore_errors=True)


def make_project(project: Path) -> Path:
    copy_project(project, COPIED)
    write_shards(project / "data" / "shards")
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(PARAMS))
    load_params(params_file)  # a bad key fails here, not in the job
    return params_file


def submit(head: dict, project: Path, submission_id: str, *train_args: str,
           module: str = "pipelines.stages.train") -> tuple[str, str]:
    """`ray job submit` (waits and streams the job's log); return the job's final status and the log."""
    url, env = head["url"], head["env"]
    command = [RAY, "job", "submit", "--address", url, "--submission-id", submission_id,
               "--working-dir", str(project), "--", "python", "-m", module, *train_args]
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired:
        subprocess.run([RAY, "job", "stop", "--address", url, submission_id], env=env, capture_output=True,
                       timeout=60)
        raise
    job = requests.get(f"{url}/api/jobs/{submission_id}", headers=head["headers"], timeout=30)
    job.raise_for_status()
    return job.json()["status"], run.stdout + run.stderr


def copies_of_the_working_dir(temp_dir: Path) -> list[Path]:
    # session_latest links to the one session directory: resolve, or it counts twice.
    return sorted({d.resolve() for d in temp_dir.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")})


def test_stage_refuses_to_write_into_the_jobs_copy(ray_head, tmp_path):
    project = tmp_path / "project"
    make_project(project)
    # A relative params path resolves inside Ray's copy of the working dir.
    status, log = submit(ray_head, project, "fcn-copy-refused", "--stage", "fcn32s", "--params", "params.yaml")
    assert status == "FAILED", log[-6000:]
    assert "temporary copy of the working directory" in log and "train.models_dir" in log, log[-6000:]
    assert "mlflow.db_file" in log and '--params "$PWD/params.yaml"' in log, log[-6000:]
    assert not (project / "models").exists() and not (project / "reports").exists()


def test_stage_runs_as_a_ray_job_and_writes_into_the_project(ray_head, tmp_path):
    project = tmp_path / "project"
    params_file = make_project(project)
    status, log = submit(ray_head, project, "fcn-stage-fcn32s", "--stage", "fcn32s", "--params", str(params_file))
    assert status == "SUCCEEDED", log[-6000:]

    # The job ran in a copy holding the code but not what .gitignore leaves out; the
    # outputs are in the project, none in the copy.
    copies = [c for c in copies_of_the_working_dir(ray_head["temp_dir"]) if (c / "pipelines" / "stages" / "train.py").is_file()]
    assert copies, f"no copy of the working dir under {ray_head['temp_dir']}"
    for copy in copies:
        assert (copy / "fcn_models").is_dir()
        leftovers = [n for n in ("data/shards", "models", "reports", "ray_results", "mlflow.db")
                     if (copy / n).exists()]
        assert leftovers == [], f"{copy} holds {leftovers}"
    storage = project / "ray_results"
    assert f"in {storage}; weights start from random" in log, log[-6000:]
    runs = [d for d in storage.iterdir() if d.name.startswith("fcn32s-")]
    assert len(runs) == 1 and any(runs[0].glob("checkpoint_*")), sorted(storage.rglob("*"))[:20]

    metrics = json.loads((project / "reports" / "fcn32s" / "metrics.json").read_text())
    assert metrics["iterations"] == ITERATIONS and metrics["best_iteration"] in (VAL_EVERY, ITERATIONS)
    assert metrics["init"].startswith("random")
    history = read_history(project / "reports" / "fcn32s" / "history.csv")
    assert [row["iteration"] for row in history] == [VAL_EVERY, ITERATIONS]
    best = next(row for row in history if row["iteration"] == metrics["best_iteration"])
    for key in SCORE_KEYS:
        assert 0.0 <= metrics[key] <= 1.0
        assert best[key] == pytest.approx(metrics[key], abs=1e-6)

    model, meta = load_checkpoint(project / "models" / "fcn32s")
    assert meta["stage"] == "fcn32s" and meta["iterations"] == metrics["best_iteration"]
    assert meta["val"]["mean_iu"] == pytest.approx(metrics["mean_iu"], abs=1e-9)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 24, 32)).shape == (1, 21, 24, 32)

    # The stage's MLflow run is in the project's store, tagged with the stage.
    from mlflow import MlflowClient

    mlflow_client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = mlflow_client.get_experiment_by_name(load_params(params_file).mlflow.experiment)
    assert experiment is not None, "no MLflow experiment in the project's mlflow.db"
    mlflow_runs = mlflow_client.search_runs([experiment.experiment_id], filter_string="tags.`fcn.stage` = 'fcn32s'")
    assert len(mlflow_runs) == 1
    assert mlflow_runs[0].info.status == "FINISHED"
    assert mlflow_runs[0].data.metrics["mean_iu"] == pytest.approx(history[-1]["mean_iu"], abs=1e-6)


def test_batch_inference_runs_as_a_ray_job_on_the_clusters_actors(ray_head, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    project = tmp_path / "project"
    params_file = make_project(project)
    # Under models/, which .gitignore keeps out of the upload: the job reads it from the project.
    make_checkpoint(project / "models" / "fcn8s", seed=6, mean_iu=0.5)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for name, size in (("one", (40, 52)), ("two", (29, 33)), ("three", (57, 41))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"{name}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "predictions"
    status, log = submit(ray_head, project, "fcn-predict-batch", str(images), "--model",
                         str(project / "models" / "fcn8s"), "--out", str(out), "--actors", "2",
                         "--params", str(params_file), module="pipelines.commands.predict_batch")
    assert status == "SUCCEEDED", log[-6000:]
    assert "3 of 4 images segmented" in log and f"{images / 'broken.png'}: not an image" in log, log[-6000:]
    summary = {r["image"]: r for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert sorted(summary) == ["broken", "one", "three", "two"] and summary["broken"]["error"]
    for name in ("one", "two", "three"):
        image = np.asarray(Image.open(images / f"{name}.png").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}_mask.png")),
                                      checkpoint_mask(project / "models" / "fcn8s", image))
