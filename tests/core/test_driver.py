"""A stage's driver: who it is, whether it still runs, one driver per run, and runs left behind by a dead one.

Real processes throughout: a driver that is gone is a child process that ran and was
reaped; the lock is held by another Python process, then that process is killed
with SIGKILL. The sweep runs against the project's kind of MLflow store (SQLite).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from pipelines.core import driver
from pipelines.core.params import PROJECT_ROOT, parse_params
from pipelines.commands import status as status_stage
from pipelines.track import stage_runs, store
from pipelines.train import recipe
from support.training import make_params, write_shards


def gone_process() -> dict:
    """The identity of a process that ran on this host and has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    import psutil

    started = psutil.Process(child.pid).create_time()
    child.wait()
    return {"host": socket.gethostname(), "pid": child.pid, "started": started}


def test_a_driver_is_gone_only_when_it_ran_here_and_runs_no_more():
    me = driver.identity()
    assert me["pid"] == os.getpid() and me["host"] == socket.gethostname()
    assert not driver.is_gone(me)
    assert driver.is_gone(gone_process())
    # The same pid with another start time is another process: this one's driver is gone.
    assert driver.is_gone({**me, "started": me["started"] - 3600})
    # Another host's driver, or a record without one, is never taken for gone.
    assert not driver.is_gone({**gone_process(), "host": "elsewhere.example"})
    assert not driver.is_gone({"host": None, "pid": None, "started": None})


HOLDER = textwrap.dedent("""
    import sys, time
    from pipelines.core import driver
    with driver.hold_run(sys.argv[1], "run-a"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_one_driver_per_run_and_the_hold_ends_with_its_process(tmp_path):
    storage = str(tmp_path / "ray_results")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, storage], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(driver.RunHeldError) as err:
            with driver.hold_run(storage, "run-a"):
                pass
        message = str(err.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
        assert "run-a" in message and "another driver" in message
        # Another run in the same storage is free.
        with driver.hold_run(storage, "run-b") as path:
            assert path == tmp_path / "ray_results" / driver.LOCK_DIR / "run-b.lock"
            assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Killed, it left no stale lock.
    with driver.hold_run(storage, "run-a"):
        pass


def test_storage_given_as_a_uri_is_held_on_this_machine():
    path = driver.lock_path("s3://bucket/runs", "run-a")
    assert path.parent.name == "fcn-run-locks" and path == driver.lock_path("s3://bucket/runs/", "run-a")
    assert path != driver.lock_path("s3://bucket/runs", "run-b")


def test_runs_of_a_gone_driver_are_marked_failed_with_a_note(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params({}, root=tmp_path)
    experiment_id = store.set_up(params)
    client = MlflowClient(tracking_uri=store.tracking_uri(params))

    def run(stage, record):
        tags = {stage_runs.STAGE_TAG: stage, stage_runs.RAY_RUN_TAG: f"{stage}-x"}
        tags.update({stage_runs.DRIVER_TAG + k: str(v) for k, v in (record or {}).items()})
        return client.create_run(experiment_id, tags=tags).info.run_id

    dead = gone_process()
    lost = run("fcn32s", dead)
    alive = run("fcn16s", driver.identity())
    elsewhere = run("fcn8s", {**gone_process(), "host": "elsewhere.example"})
    unrecorded = run("fcn8s-atonce", None)
    finished = run("fcn32s-fixed", gone_process())
    client.set_terminated(finished, "FINISHED")

    assert status_stage.main(["--params", str(tmp_path / "params.yaml")]) == 2  # no params file: a params error
    (tmp_path / "params.yaml").write_text("{}\n")
    assert status_stage.main(["--params", str(tmp_path / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"marked FAILED: MLflow run {lost} (fcn32s): its driver is gone (host {dead['host']}, pid {dead['pid']}" \
        in out
    statuses = {r: client.get_run(r).info.status for r in (lost, alive, elsewhere, unrecorded, finished)}
    assert statuses == {lost: "FAILED", alive: "RUNNING", elsewhere: "RUNNING", unrecorded: "RUNNING",
                        finished: "FINISHED"}
    note = client.get_run(lost).data.tags[stage_runs.NOTE_TAG]
    assert f"pid {dead['pid']}" in note and "`fcn train --stage fcn32s`" in note
    # The listing: one line per stage run, the lost one FAILED with its driver.
    table = {line.split()[1]: line.split()[0] for line in out.splitlines()[2:]}
    assert table == {"fcn32s": "FAILED", "fcn16s": "RUNNING", "fcn8s": "RUNNING", "fcn8s-atonce": "RUNNING",
                     "fcn32s-fixed": "FINISHED"}
    # A second sweep finds nothing left to mark.
    assert stage_runs.sweep_lost_runs(params) == []


def test_a_stage_start_marks_the_runs_of_a_gone_driver_failed(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "shards")
    params = make_params(tmp_path, {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 4}})
    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    dead = gone_process()
    lost = client.create_run(store.set_up(params), tags={
        stage_runs.STAGE_TAG: "fcn16s", stage_runs.RAY_RUN_TAG: "fcn16s-x",
        **{stage_runs.DRIVER_TAG + k: str(v) for k, v in dead.items()}}).info.run_id

    init = recipe.StageInit(source="random", path=None, note="random (test)")
    started = stage_runs.open_stage_run(params, "fcn32s", tmp_path, "fcn32s-y", str(tmp_path / "ray_results"), init,
                                      recipe.stage_params(params, "fcn32s", init))
    out = capsys.readouterr().out
    assert f"[fcn32s] MLflow run {lost} (fcn16s) was left RUNNING by a driver that is gone (host {dead['host']}, " \
        f"pid {dead['pid']}" in out
    assert client.get_run(lost).info.status == "FAILED"
    note = client.get_run(lost).data.tags[stage_runs.NOTE_TAG]
    assert f"pid {dead['pid']}" in note and "`fcn train --stage fcn16s`" in note
    # The stage's own run, opened by this (living) driver, is left running.
    assert client.get_run(started.run_id).info.status == "RUNNING"
    stage_runs.end_stage_run(started, "FINISHED")


def test_more_logical_cpus_than_cores_is_allowed_and_said():
    from pipelines.train import cluster

    params = parse_params({"ray": {"num_workers": 2, "cpus_per_worker": 64, "data_cpus": 1}})
    num_cpus, warning = cluster.local_cpus(params.ray, cores=2)
    assert num_cpus == 129
    assert warning == ("WARNING: ray.num_workers (2) x ray.cpus_per_worker (64) + ray.data_cpus (1) = 129 logical "
                       "CPUs on a machine with 2 cores: allowed, but the workers share cores and train slower than "
                       "with fewer CPUs asked for")
    # What fits says nothing, and the cluster still gets every core.
    fits = parse_params({"ray": {"num_workers": 2, "cpus_per_worker": 0.5, "data_cpus": 0.5}})
    assert cluster.local_cpus(fits.ray, cores=2) == (2, None)
    assert cluster.local_cpus(fits.ray, cores=16) == (16, None)
