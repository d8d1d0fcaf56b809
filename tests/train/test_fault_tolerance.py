"""Fault tolerance: a training worker killed with SIGKILL in the middle of a stage.

The run must go on from its last checkpoint (the steps after it redone, none
skipped) and end where an uninterrupted run ends. The training loop writes each
worker's pid and every completed iteration, with its attempt number, to
a trace directory (pipelines.train.loop.Trace, which only tests turn on); the kill comes once Ray has registered a checkpoint and a
couple of steps past it have been taken, and the run resumes from the newest checkpoint Ray
had registered by then (or a later one).
"""
import json
import os
import signal
import threading
import time

import pytest

from pipelines.track import store
from pipelines.train import trainer
from pipelines.train.loop import Trace
from support.ray_runs import registered_iteration
from support.training import make_params, read_history, write_shards

ITERATIONS, VAL_EVERY = 12, 4
# Iterations past the first checkpoint before the kill, so there is work to redo.
PAST_CHECKPOINT = 2


def kill_a_worker_after_the_first_checkpoint(run_dir, progress, killed, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        registered = registered_iteration(run_dir)
        log = progress / "iterations.log"
        if registered is not None and log.exists():
            steps = Trace.read(log)["steps"].get(1, [])
            if steps and steps[-1] >= VAL_EVERY + PAST_CHECKPOINT:
                workers = [json.loads(line) for line in (progress / "workers.jsonl").read_text().splitlines()]
                victim = [w for w in workers if w["rank"] == 1][-1]
                os.kill(victim["pid"], signal.SIGKILL)
                killed.update(pid=victim["pid"], after=steps[-1], registered=registered)
                return
        time.sleep(0.02)


def test_killed_worker_resumes_from_the_last_checkpoint_and_finishes(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own SQLite store
    write_shards(tmp_path / "shards", n_train=16)
    stages = {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": ITERATIONS}}
    params = make_params(tmp_path, stages, max_failures=1, val_every=VAL_EVERY, log_every=VAL_EVERY)
    run_dir, trace = tmp_path / "ray_results" / "faulty", tmp_path / "trace"
    killed = {}
    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, args=(run_dir, trace, killed),
                              daemon=True)
    killer.start()
    metrics = trainer.run_stage(params, "fcn32s", tmp_path, run_name="faulty", trace_dir=str(trace))
    killer.join(timeout=5)

    assert killed, "no worker was killed: the run ended before a checkpoint was registered"
    assert killed["after"] < ITERATIONS
    log = Trace.read(trace / "iterations.log")
    # Two attempts: the first from scratch, the second from the last checkpoint the first reported.
    assert [attempt for attempt, _ in log["starts"]] == [1, 2]
    assert log["starts"][0] == (1, 0)
    resumed_at = log["starts"][1][1]
    first, second = log["steps"][1], log["steps"][2]
    assert first == list(range(1, len(first) + 1)) and first[-1] >= killed["after"]
    # The last checkpoint Ray Train registered: the newest one at the kill, or one it took in
    # between the kill and noticing it. A worker's report returns before the controller takes
    # it in (on its next poll), so a checkpoint logged as reported may not be registered yet.
    reported = [i for attempt, i in log["checkpoints"] if attempt == 1]
    assert killed["registered"] <= resumed_at <= first[-1]
    assert resumed_at in reported and resumed_at % VAL_EVERY == 0
    # The steps after the checkpoint are redone, none is skipped, and the run ends where it should.
    assert second == list(range(resumed_at + 1, ITERATIONS + 1))
    assert sorted(set(first) | set(second)) == list(range(1, ITERATIONS + 1))

    # Outputs as an uninterrupted run's: every validation once, the final iteration count.
    assert metrics["iterations"] == ITERATIONS
    history = read_history(tmp_path / "reports" / "fcn32s" / "history.csv")
    assert [row["iteration"] for row in history] == list(range(VAL_EVERY, ITERATIONS + 1, VAL_EVERY))
    pids = [json.loads(line) for line in (trace / "workers.jsonl").read_text().splitlines()]
    assert len(pids) == 4 and killed["pid"] not in [w["pid"] for w in pids[2:]]

    # MLflow: one run through both attempts, finished, every validation logged once as in history.csv.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    runs = client.search_runs([client.get_experiment_by_name(params.mlflow.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "mean_iu"))
    assert logged == [(int(row["iteration"]), pytest.approx(row["mean_iu"], rel=1e-12)) for row in history]
