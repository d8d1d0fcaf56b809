"""Faults of the driver itself, with real processes: `python -m pipelines.stages.train` in a session of
its own, as `dvc repro` or a terminal runs it, on a project of tiny shards.

Interrupted: while driver A trains (past its first checkpoint), its process tree's
listening sockets are listed; driver B, started the same way on the same project and
run name, must stop at once naming A; then Ctrl-C (SIGINT to A's process
group, as a terminal sends it) must end A with status 130, a line saying how to
resume, and its MLflow run KILLED.

Killed: driver C is killed with SIGKILL past its first checkpoint. The local Ray
cluster it started must not outlive it, and its MLflow run, left RUNNING, is
marked FAILED by `fcn status`. C asks for more logical CPUs than the machine has
cores: it says so, once.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pipelines.core.params import PROJECT_ROOT, load_params
from pipelines.track import stage_runs, store
from pipelines.train import cluster
from pipelines.train.rendezvous import is_loopback
from support.training import WIDTH, write_shards

STAGE = "fcn32s"
VAL_EVERY = 2
# Far more than a test waits for: the drivers are stopped from outside.
ITERATIONS = 100_000


def make_project(root: Path, **ray_knobs) -> Path:
    write_shards(root / "shards")
    params = {
        "data": {"shards_dir": "shards"},
        "model": {"width": WIDTH, "imagenet_weights": None},
        "train": {"loss": "mean", "optimizer": "adam", "val_every": VAL_EVERY, "log_every": 1,
                  "checkpoints_to_keep": 2,
                  "stages": {STAGE: {"init": "imagenet", "lr": 1e-3, "iterations": ITERATIONS}}},
        "ray": {"num_workers": 2, "cpus_per_worker": 0.5, "data_cpus": 0.5, "max_failures": 0, **ray_knobs},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def train_command(params_file: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.stages.train", "--stage", STAGE, "--params", str(params_file)]


def start_driver(params_file: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(train_command(params_file), cwd=params_file.parent, stdout=out,
                                stderr=subprocess.STDOUT, env=environment(), start_new_session=True)


def wait_for_checkpoint(driver: subprocess.Popen, log: Path, timeout_s: float = 600) -> Path:
    """The run directory, once Ray Train has registered the run's first checkpoint."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            pytest.fail(f"the driver ended early ({driver.returncode}):\n{log.read_text()[-3000:]}")
        found = re.search(r"\] run (\S+) in (\S+); weights start", log.read_text())
        if found:
            run_dir = Path(found[2]) / found[1]
            if (run_dir / "checkpoint_manager_snapshot.json").exists():
                return run_dir
        time.sleep(0.5)
    pytest.fail(f"no checkpoint within {timeout_s} s:\n{log.read_text()[-3000:]}")


def tree(process: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(process.pid)
    return [root, *root.children(recursive=True)]


def listening(processes) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of the processes."""
    found = []
    for p in processes:
        try:
            found += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return found


def stop_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def experiment_runs(params_file: Path):
    from mlflow import MlflowClient

    params = load_params(params_file)
    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    return client, client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupted")
    params_file = make_project(root)
    a = start_driver(params_file, root / "a.log")
    try:
        run_dir = wait_for_checkpoint(a, root / "a.log")
        sockets = listening(tree(a))
        started = time.monotonic()
        # The run A trains, named as a user would name it to resume it by hand.
        b = subprocess.run([*train_command(params_file), "--run-name", run_dir.name], cwd=root, capture_output=True,
                           text=True, env=environment(), timeout=600)
        b_seconds = time.monotonic() - started
        a_alive_after_b = a.poll() is None
        os.killpg(a.pid, signal.SIGINT)  # Ctrl-C in A's terminal
        a.wait(timeout=600)
    finally:
        stop_group(a)
    return {"root": root, "params": params_file, "run_dir": run_dir, "sockets": sockets, "a": a,
            "a_log": (root / "a.log").read_text(), "b": b, "b_seconds": b_seconds, "a_alive_after_b": a_alive_after_b}


def test_a_training_stage_listens_on_loopback_only(interrupted):
    sockets = interrupted["sockets"]
    outside = [s for s in sockets if not is_loopback(s[1])]
    assert outside == [], f"listening beyond 127.0.0.1: {outside}"
    # The listing saw the training workers (gloo's sockets) and Ray's own processes.
    names = {name for name, _, _ in sockets}
    assert "ray::RayTrainWorker" in names and "raylet" in names and "gcs_server" in names, names


def test_ray_trains_placement_group_cleaner_can_see_the_controller(interrupted):
    # Without the State API it logged "Failed to query Ray Train Controller actor state" every
    # second of training; once Ctrl-C has stopped the dashboard, it may still ask once.
    assert interrupted["a_log"].count("Failed to query Ray Train Controller actor state") <= 1


def test_a_second_driver_of_the_same_run_stops_at_once_naming_the_first(interrupted):
    b, a = interrupted["b"], interrupted["a"]
    assert b.returncode == 1, b.stdout + b.stderr
    last = b.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train: run {interrupted['run_dir'].name} in ")
    assert f"another driver (host {socket.gethostname()}, pid {a.pid}," in last
    # It stopped before Ray or MLflow: no cluster started, no MLflow run opened or touched.
    assert "Started a local Ray instance" not in b.stdout + b.stderr and "MLflow run" not in b.stdout
    assert interrupted["a_alive_after_b"]
    # At once: a correctness bound (it must not start Ray or MLflow first), not a benchmark.
    assert interrupted["b_seconds"] < 60
    client, runs = experiment_runs(interrupted["params"])
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "mean_iu")]
    assert steps and len(steps) == len(set(steps))


def test_ctrl_c_ends_the_stage_killed_with_status_130_and_how_to_resume(interrupted):
    a, log = interrupted["a"], interrupted["a_log"]
    assert a.returncode == 130, log[-3000:]
    # The hint repeats the params file A was given: the default one would not resume this run.
    assert (f"train: interrupted; run `fcn train --stage {STAGE} --params {interrupted['params']}` again: it "
            "resumes from the last checkpoint" in log.splitlines()), log[-3000:]
    _, runs = experiment_runs(interrupted["params"])
    assert [r.info.status for r in runs] == ["KILLED"]
    # The run's checkpoints are left for the resume.
    assert (interrupted["run_dir"] / "checkpoint_manager_snapshot.json").exists()


def test_the_resume_hint_repeats_the_options_given(tmp_path, monkeypatch, capsys):
    """Ctrl-C is simulated (KeyboardInterrupt from reading the params), since no Ray is wanted
    here; the fixture's driver A takes a real SIGINT."""
    from pipelines.stages import train as train_stage

    def interrupted(path):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_stage, "load_params", interrupted)
    params_file = tmp_path / "my params.yaml"
    assert train_stage.main(["--stage", STAGE, "--params", str(params_file), "--run-name", "mine"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"train: interrupted; run `fcn train --stage {STAGE} --params '{params_file}' --run-name mine` again: "
        "it resumes from the last checkpoint")
    # Defaults are left out.
    assert train_stage.main(["--stage", STAGE]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"train: interrupted; run `fcn train --stage {STAGE}` again: it resumes from the last checkpoint")


def test_a_killed_driver_takes_its_cluster_along_and_its_run_is_marked_failed(tmp_path):
    cores = cluster.machine_cores()
    # Two workers of a bit more than half the machine each: more logical CPUs than cores.
    params_file = make_project(tmp_path, cpus_per_worker=cores / 2 + 0.5)
    c = start_driver(params_file, tmp_path / "c.log")
    try:
        wait_for_checkpoint(c, tmp_path / "c.log")
        processes = {p.pid: p for p in tree(c)[1:]}
        names = {p.name() for p in processes.values()}
        assert {"raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
        os.kill(c.pid, signal.SIGKILL)
        c.wait(timeout=60)
        deadline = time.monotonic() + 30
        left = list(processes.values())
        while left and time.monotonic() < deadline:
            left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.5)
        assert left == [], f"still running 30 s after the driver was killed: {[(p.pid, p.name()) for p in left]}"
    finally:
        stop_group(c)
    log = (tmp_path / "c.log").read_text()
    assert log.count("logical CPUs on a machine with") == 1, log[-3000:]
    assert f"on a machine with {cores} cores: allowed, but" in log

    client, runs = experiment_runs(params_file)
    assert [r.info.status for r in runs] == ["RUNNING"]
    run_id = runs[0].info.run_id
    assert runs[0].data.tags[stage_runs.DRIVER_TAG + "pid"] == str(c.pid)
    status = subprocess.run([sys.executable, "-m", "pipelines.commands.status", "--params", str(params_file)],
                            capture_output=True, text=True, env=environment(), timeout=300)
    assert status.returncode == 0, status.stderr
    assert f"marked FAILED: MLflow run {run_id} ({STAGE}): its driver is gone" in status.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert f"pid {c.pid}" in run.data.tags[stage_runs.NOTE_TAG]
