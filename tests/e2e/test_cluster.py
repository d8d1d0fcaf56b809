"""A training stage on a Ray cluster of two nodes, submitted as a Ray job, and the same
stage losing its second node half-way.

The cluster is what docs/CLUSTER.md starts on real machines, here on one
machine: a head (`ray start --head`) and a second node (`ray start --address`), each a
raylet with its own object store, all on 127.0.0.1 with token authentication
(tests/e2e/ray_nodes.py). The stage's two workers are placed with
`ray.placement_strategy: SPREAD`, Ray Train's run state goes to a `ray.storage_path`
outside the project (the shared storage of a real cluster), and `fcn train --trace-dir`
records each attempt's start and steps. The second node is killed with SIGKILL, its
raylet, object store and workers at once, once a checkpoint is registered and two
steps past it are done: the worker group restarts on the head, from that checkpoint.
With STRICT_SPREAD instead, the head alone cannot hold the restarted workers: the stage
stops saying so, and run again with SPREAD (which decides no result, so it is the same
run) it resumes from the last checkpoint.
"""
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from support.project_copy import copy_project
from support.ray_runs import checkpoints_on_disk, registered_iteration, registered_iterations
from support.ray_nodes import (
    RAY,
    add_node,
    alive_nodes,
    kill_node,
    new_token,
    ray_env,
    short_temp_dir,
    start_head,
    stop_node,
    wait_for_head_node,
)

from pipelines.core.params import load_params
from pipelines.train.loop import Trace
from support.training import WIDTH, read_history, write_shards

ITERATIONS, VAL_EVERY = 12, 4
# Steps past the first registered checkpoint before the node is killed, so there is work to redo.
PAST_CHECKPOINT = 2
COPIED = ["pipelines", "fcn_models", ".gitignore"]
PLACED = re.compile(r"\[fcn32s\] workers from iteration (\d+): (.*)")
RANK = re.compile(r"rank (\d+) on node ([0-9a-f]+) \(([^)]+)\)")
# Find a dead node in seconds, not the default half minute.
HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                 "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@pytest.fixture(scope="module")
def head():
    """A head node with 2 CPUs: room for both workers (0.5 CPU each) and Ray Data (0.5) on its own."""
    temp_dir = short_temp_dir("fcnhead-")
    env = ray_env(new_token(temp_dir), **HEALTH_CHECKS)
    node = start_head(temp_dir, env, num_cpus=2)
    try:
        yield {**node, "env": env, "temp_dir": temp_dir, "node_id": wait_for_head_node(node)}
    finally:
        stop_node(node["process"])


@pytest.fixture
def second_node(head):
    """A second node with 1 CPU, joined to the head, stopped after the test (if still alive)."""
    temp_dir = short_temp_dir("fcnnode-")
    node = add_node(head, temp_dir, head["env"], num_cpus=1)
    try:
        assert {n["node_id"] for n in alive_nodes(head)} == {head["node_id"], node["node_id"]}
        yield node
    finally:
        stop_node(node["process"])


def make_project(root: Path, placement: str, max_failures: int, iterations: int = ITERATIONS,
                 val_every: int = VAL_EVERY) -> tuple[Path, Path]:
    """A project of code and tiny shards; Ray Train's storage outside it. Returns (params file, storage)."""
    project, storage = root / "project", root / "shared" / "ray_results"
    copy_project(project, COPIED)
    write_shards(project / "data" / "shards", n_train=16)
    params = {
        "data": {"shards_dir": "data/shards"},
        "model": {"width": WIDTH, "imagenet_weights": None},
        "train": {"loss": "mean", "val_every": val_every, "log_every": 1, "checkpoints_to_keep": 2,
                  "stages": {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": iterations}}},
        "ray": {"num_workers": 2, "cpus_per_worker": 0.5, "data_cpus": 0.5, "max_failures": max_failures,
                "placement_strategy": placement, "storage_path": str(storage)},
    }
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    load_params(params_file)  # a bad key fails here, not in the job
    return params_file, storage


def submit(head: dict, project: Path, submission_id: str, trace: Path, runtime_env: dict | None = None) -> None:
    """`ray job submit --no-wait` of the train stage, its params file by absolute path."""
    command = [RAY, "job", "submit", "--address", head["url"], "--submission-id", submission_id, "--no-wait",
               "--working-dir", str(project)]
    if runtime_env:
        command += ["--runtime-env-json", json.dumps(runtime_env)]
    command += ["--", "python", "-m", "pipelines.stages.train", "--stage", "fcn32s",
                "--params", str(project / "params.yaml"), "--trace-dir", str(trace)]
    run = subprocess.run(command, env=head["env"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def job(head: dict, submission_id: str) -> dict:
    response = requests.get(f"{head['url']}/api/jobs/{submission_id}", headers=head["headers"], timeout=30)
    response.raise_for_status()
    return response.json()


def job_log(head: dict, submission_id: str) -> str:
    response = requests.get(f"{head['url']}/api/jobs/{submission_id}/logs", headers=head["headers"], timeout=30)
    response.raise_for_status()
    return response.json()["logs"]


def wait_for_job(head: dict, submission_id: str, timeout_s: float = 900) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = job(head, submission_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status, job_log(head, submission_id)
        time.sleep(1)
    requests.post(f"{head['url']}/api/jobs/{submission_id}/stop", headers=head["headers"], timeout=30)
    raise AssertionError(f"job {submission_id} still running after {timeout_s} s:\n"
                         f"{job_log(head, submission_id)[-6000:]}")


def placements(log: str) -> list[tuple[int, dict[int, str]]]:
    """Each attempt's (start iteration, {rank: node id}) as the stage logged them."""
    found = []
    for start, ranks in PLACED.findall(log):
        nodes = {int(rank): node for rank, node, ip in RANK.findall(ranks)}
        assert all(ip == "127.0.0.1" for _, _, ip in RANK.findall(ranks)), ranks
        found.append((int(start), nodes))
    return found


def one_run_dir(storage: Path) -> Path:
    runs = [d for d in storage.iterdir() if d.name.startswith("fcn32s-")]
    assert len(runs) == 1, sorted(storage.iterdir())
    return runs[0]


def mlflow_runs(project: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(load_params(project / "params.yaml").mlflow.experiment)
    assert experiment is not None, "no MLflow experiment in the project's store"
    return client, client.search_runs([experiment.experiment_id])


def kill_after_first_checkpoint(node: dict, run_dir_parent: Path, trace: Path, timeout_s: float = 600) -> dict:
    """SIGKILL the node once Ray Train registered a checkpoint and attempt 1 is PAST_CHECKPOINT
    steps beyond it; return the last step attempt 1 had taken and the checkpoint registered then."""
    deadline = time.monotonic() + timeout_s
    log = trace / "iterations.log"
    while time.monotonic() < deadline:
        runs = list(run_dir_parent.glob("fcn32s-*"))
        registered = registered_iteration(runs[0]) if len(runs) == 1 else None
        if registered is not None and log.exists():
            steps = Trace.read(log)["steps"].get(1, [])
            if steps and steps[-1] >= VAL_EVERY + PAST_CHECKPOINT:
                kill_node(node)
                return {"after": steps[-1], "registered": registered}
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint registered in {timeout_s} s")


def test_workers_spread_over_two_nodes_in_a_ray_job(head, second_node, tmp_path):
    iterations, val_every = 4, 2
    params_file, storage = make_project(tmp_path, "SPREAD", max_failures=0, iterations=iterations,
                                        val_every=val_every)
    project, trace = params_file.parent, tmp_path / "trace"
    submit(head, project, "fcn-spread", trace)
    status, log = wait_for_job(head, "fcn-spread")
    assert status == "SUCCEEDED", log[-6000:]

    # One worker on each node, by node id, as the stage logged it.
    nodes = {n["node_id"]: n for n in alive_nodes(head)}
    head_id = next(i for i, n in nodes.items() if n["is_head_node"])
    assert set(nodes) == {head_id, second_node["node_id"]}
    placed = placements(log)
    assert len(placed) == 1, log[-6000:]
    start, ranks = placed[0]
    assert start == 0 and sorted(ranks) == [0, 1]
    assert set(ranks.values()) == {head_id, second_node["node_id"]}

    # One attempt, every step once; checkpoints at every validation, Ray kept the last two.
    record = Trace.read(trace / "iterations.log")
    assert record["starts"] == [(1, 0)]
    assert record["steps"] == {1: list(range(1, iterations + 1))}
    assert record["checkpoints"] == [(1, i) for i in range(val_every, iterations + 1, val_every)]
    run_dir = one_run_dir(storage)
    assert registered_iterations(run_dir) == checkpoints_on_disk(run_dir) == [iterations - val_every, iterations]
    assert not (project / "ray_results").exists()

    metrics = json.loads((project / "reports" / "fcn32s" / "metrics.json").read_text())
    assert metrics["iterations"] == iterations
    history = read_history(project / "reports" / "fcn32s" / "history.csv")
    assert [row["iteration"] for row in history] == list(range(val_every, iterations + 1, val_every))
    _, runs = mlflow_runs(project)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_losing_the_second_node_restarts_the_workers_on_the_head_from_the_last_checkpoint(
        head, second_node, tmp_path):
    params_file, storage = make_project(tmp_path, "SPREAD", max_failures=1)
    project, trace = params_file.parent, tmp_path / "trace"
    submit(head, project, "fcn-node-lost", trace)
    killed = kill_after_first_checkpoint(second_node, storage, trace)
    status, log = wait_for_job(head, "fcn-node-lost")
    assert status == "SUCCEEDED", log[-6000:]
    assert killed["after"] < ITERATIONS
    nodes = {n["node_id"] for n in alive_nodes(head)}
    head_id = next(n["node_id"] for n in alive_nodes(head) if n["is_head_node"])
    assert nodes == {head_id}, "the killed node is still listed alive"

    # Attempt 1 on both nodes; attempt 2 on the head alone, from the last checkpoint attempt 1 reported.
    record = Trace.read(trace / "iterations.log")
    assert [attempt for attempt, _ in record["starts"]] == [1, 2]
    resumed_at = record["starts"][1][1]
    reported = [i for attempt, i in record["checkpoints"] if attempt == 1]
    first, second = record["steps"][1], record["steps"][2]
    assert first == list(range(1, len(first) + 1)) and first[-1] >= killed["after"]
    # The newest checkpoint Ray Train had registered at the kill, or one it took in before it
    # noticed the node was gone; a reported one is not yet registered until the controller polls.
    assert killed["registered"] <= resumed_at <= first[-1]
    assert resumed_at in reported and resumed_at % VAL_EVERY == 0
    assert second == list(range(resumed_at + 1, ITERATIONS + 1))
    placed = placements(log)
    assert [start for start, _ in placed] == [0, resumed_at], log[-6000:]
    assert set(placed[0][1].values()) == {head_id, second_node["node_id"]}
    assert set(placed[1][1].values()) == {head_id} and sorted(placed[1][1]) == [0, 1]

    # The outputs are an uninterrupted run's: the final iteration count, every validation once.
    metrics = json.loads((project / "reports" / "fcn32s" / "metrics.json").read_text())
    assert metrics["iterations"] == ITERATIONS
    history = read_history(project / "reports" / "fcn32s" / "history.csv")
    assert [row["iteration"] for row in history] == list(range(VAL_EVERY, ITERATIONS + 1, VAL_EVERY))
    # Ray keeps the best two by mean IU, and always the latest.
    kept = registered_iterations(one_run_dir(storage))
    assert len(kept) == 2 and kept[-1] == ITERATIONS and all(i % VAL_EVERY == 0 for i in kept)
    # One MLflow run through both attempts, each validation logged once.
    client, runs = mlflow_runs(project)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "mean_iu"))
    assert logged == [int(row["iteration"]) for row in history]


def test_without_room_for_the_workers_the_stage_stops_saying_what_it_needs_and_resumes_later(
        head, second_node, tmp_path):
    params_file, storage = make_project(tmp_path, "STRICT_SPREAD", max_failures=1)
    project, trace = params_file.parent, tmp_path / "trace"
    # A restarted worker group waits this long for room before the attempt counts as failed.
    submit(head, project, "fcn-no-room", trace, {"env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"}})
    killed = kill_after_first_checkpoint(second_node, storage, trace)
    status, log = wait_for_job(head, "fcn-no-room")
    assert status == "FAILED", log[-6000:]
    assert "the Ray cluster can no longer hold its workers: ray.placement_strategy STRICT_SPREAD puts each of " \
           "the 2 workers, 0.5 CPU each, on a node of its own" in log, log[-6000:]
    assert "the Ray cluster has 1 alive node (2 CPU), room for 1 that way: add nodes, use SPREAD" in log, log[-6000:]
    # Nothing half-done where the next stage would read it; the checkpoints stay for a rerun.
    assert not (project / "models").exists() and not (project / "reports").exists()
    record = Trace.read(trace / "iterations.log")
    assert [attempt for attempt, _ in record["starts"]] == [1]
    kept_run = one_run_dir(storage).name
    # The run resumes from the last checkpoint Ray Train registered (at the kill or after it); a
    # newer one a worker reported, even if its directory was written, was never taken in.
    resume_from = registered_iteration(one_run_dir(storage))
    reported = [i for attempt, i in record["checkpoints"] if attempt == 1]
    assert resume_from is not None and killed["registered"] <= resume_from < ITERATIONS
    assert resume_from in reported and resume_from in registered_iterations(one_run_dir(storage))
    _, runs = mlflow_runs(project)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"

    # As the message says, SPREAD fits the head alone; placement decides no result, so the same
    # run resumes from that checkpoint and finishes, in the same MLflow run.
    params = yaml.safe_load(params_file.read_text())
    params["ray"]["placement_strategy"] = "SPREAD"
    params_file.write_text(yaml.safe_dump(params))
    submit(head, project, "fcn-no-room-spread", trace)
    status, log = wait_for_job(head, "fcn-no-room-spread")
    assert status == "SUCCEEDED", log[-6000:]
    record = Trace.read(trace / "iterations.log")
    assert record["starts"] == [(1, 0), (2, resume_from)]
    assert record["steps"][2] == list(range(resume_from + 1, ITERATIONS + 1))
    placed = placements(log)
    assert [start for start, _ in placed] == [resume_from]
    assert set(placed[0][1].values()) == {head["node_id"]}
    assert one_run_dir(storage).name == kept_run
    metrics = json.loads((project / "reports" / "fcn32s" / "metrics.json").read_text())
    assert metrics["iterations"] == ITERATIONS
    client, runs = mlflow_runs(project)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = read_history(project / "reports" / "fcn32s" / "history.csv")
    logged = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "mean_iu"))
    assert logged == [int(row["iteration"]) for row in history] == list(range(VAL_EVERY, ITERATIONS + 1, VAL_EVERY))
