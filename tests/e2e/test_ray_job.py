"""A training stage as a Ray job, the way README's "Running on a Ray cluster" runs it.

A head node is started with `ray start --head` on 127.0.0.1 (free ports, token
authentication, its own short --temp-dir), and a small project (code, .gitignore,
params.yaml with relative paths, tiny shards under data/shards) is submitted with
`ray job submit --working-dir <project> -- python -m pipelines.stages.train --stage fcn32s
--params <project>/params.yaml`. The job runs in Ray's copy of the working
directory; its outputs must land in the project. `ray stop` would stop every Ray
instance of the user on the machine, so the head is stopped through its own
`ray start --block` process and its process group instead.
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from fcn_models.checkpoint import load_checkpoint
from fcn_models.metrics import SCORE_KEYS
from project_copy import copy_project
from pipelines.params import load_params
from test_register import checkpoint_mask, make_checkpoint
from test_train import WIDTH, read_history, write_shards

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
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(count: int) -> list[int]:
    """Distinct ports free on 127.0.0.1 right now (all held open until each is picked)."""
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM makes `ray start --block` stop what it started; its process group is the backstop."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1: its dashboard URL, the environment for the ray CLI, its
    temp dir and the HTTP headers its job API wants."""
    # Unix socket paths under --temp-dir must stay below 107 characters: a short root.
    temp_dir = Path(tempfile.mkdtemp(prefix="fcnray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    (gcs, dashboard, client, agent_http, agent_grpc, runtime_env_agent, metrics,
     autoscaler_metrics, dashboard_metrics) = free_ports(9)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # Binds every Ray process (and the job's driver, which inherits it) to 127.0.0.1.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # A token of this test's own, not ~/.ray/auth_token.
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1",
        # Stop at once on SIGTERM instead of draining the node for up to 30 s.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        AUTOSCALER_METRIC_PORT=str(autoscaler_metrics), DASHBOARD_METRIC_PORT=str(dashboard_metrics),
    )
    log = open(temp_dir / "ray_start.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env_agent),
         "--metrics-export-port", str(metrics), "--num-cpus", "4", "--object-store-memory", str(200 * 2**20),
         "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    headers = {"Authorization": f"Bearer {token_file.read_text()}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, f"ray start failed:\n{(temp_dir / 'ray_start.log').read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the Ray head did not start in 120 s"
            try:
                if requests.get(f"{url}/api/version", headers=headers, timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        yield {"url": url, "env": env, "temp_dir": temp_dir, "headers": headers}
    finally:
        stop_head(head)
        log.close()
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
                         "--params", str(params_file), module="pipelines.stages.predict_batch")
    assert status == "SUCCEEDED", log[-6000:]
    assert "3 of 4 images segmented" in log and f"{images / 'broken.png'}: not an image" in log, log[-6000:]
    summary = {r["image"]: r for r in pq.read_table(out / "summary.parquet").to_pylist()}
    assert sorted(summary) == ["broken", "one", "three", "two"] and summary["broken"]["error"]
    for name in ("one", "two", "three"):
        image = np.asarray(Image.open(images / f"{name}.png").convert("RGB"))
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}_mask.png")),
                                      checkpoint_mask(project / "models" / "fcn8s", image))
