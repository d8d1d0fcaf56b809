"""Joining or starting Ray: the cluster a stage runs on, its CPU plan, loopback binding, Ray jobs.

    connect(ray_params)          join ray.address / RAY_ADDRESS, else start a local Ray on 127.0.0.1
    local_cpus(ray_params)       the logical CPUs a local cluster gets, and a warning when they
                                 are more than the machine's cores
    check_cpu_budget(params)     the training workers and Ray Data fit in the cluster's CPUs
    check_placement(params)      the workers fit on the alive nodes as ray.placement_strategy places them
    job_working_dir_copy()       the temporary copy of the working directory a Ray job runs in

Only the driver of a stage calls these; pipelines.data.dataset never connects by itself.
A local cluster ends with the process that started it, however that ends
(pipelines.train.reaper).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from fcn_models.errors import FCNError
from pipelines.core.params import RayParams


class ClusterError(FCNError, RuntimeError):
    """A Ray cluster that cannot run the stage as configured; the message says what to change."""


def bind_loopback() -> None:
    """Make a local Ray cluster listen on 127.0.0.1 only.

    Ray binds its node to the machine's routable address unless told it is not a
    cluster; this flag (read by Ray and by every process it starts) says so.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def cpus_needed(ray_params: RayParams) -> float:
    """Logical CPUs a training run reserves: its workers plus Ray Data's decode and read tasks."""
    return ray_params.num_workers * ray_params.cpus_per_worker + ray_params.data_cpus


def machine_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_cpus(ray_params: RayParams, cores: int | None = None) -> tuple[int, str | None]:
    """(logical CPUs for a local cluster, a warning or None).

    Enough logical CPUs for the training workers plus Ray Data's tasks even on a small
    machine (otherwise data tasks wait forever for a free CPU); more than its cores is
    allowed, but the workers' threads then share cores, which is slow: the warning says so.
    """
    cores = machine_cores() if cores is None else cores
    needed = cpus_needed(ray_params)
    r = ray_params
    warning = None
    if needed > cores + 1e-9:
        warning = (f"WARNING: ray.num_workers ({r.num_workers}) x ray.cpus_per_worker ({r.cpus_per_worker:g}) + "
                   f"ray.data_cpus ({r.data_cpus:g}) = {needed:g} logical CPUs on a machine with {cores} cores: "
                   "allowed, but the workers share cores and train slower than with fewer CPUs asked for")
    return max(cores, math.ceil(needed)), warning


# This process's reaper and the write end of its pipe, open until this process ends:
# then the reaper reads end-of-file.
_reaper: tuple[subprocess.Popen, int] | None = None


def end_with_this_process() -> None:
    """Start pipelines.train.reaper for this process (once): what it starts from now on (a local
    Ray cluster) is killed when this process ends, even by SIGKILL."""
    global _reaper
    if _reaper is not None:
        return
    read_end, write_end = os.pipe()  # neither end is inherited by later children
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    process = subprocess.Popen([sys.executable, "-m", "pipelines.train.reaper", str(os.getpid())], stdin=read_end,
                               start_new_session=True, env=env)
    os.close(read_end)
    _reaper = (process, write_end)


def connect(ray_params: RayParams) -> None:
    """Join ray.address (or RAY_ADDRESS) when given, else start a local cluster on 127.0.0.1.

    In a Ray job, Ray sets RAY_ADDRESS to the cluster the job runs on, so the stage
    trains there, with the job's runtime environment (its working_dir) on every worker.
    """
    import ray

    if ray.is_initialized():
        return
    address = ray_params.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    bind_loopback()
    num_cpus, warning = local_cpus(ray_params)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    end_with_this_process()
    # OpenMP's spinning waits are left on (docs/BENCHMARKS.md compares them with passive
    # waits); on a machine shared with other jobs, OMP_WAIT_POLICY=PASSIVE in the
    # environment reaches every process of the local cluster.
    # The dashboard (on 127.0.0.1 only) serves Ray's State API, which Ray Train's placement
    # group cleaner polls every second: without it the cleaner cannot work and logs a
    # warning each time it asks.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1")


def cluster_cpus() -> float:
    """Logical CPUs of the cluster this process is connected to."""
    import ray

    if not ray.is_initialized():
        raise ClusterError("not connected to Ray: call pipelines.train.cluster.connect first")
    return ray.cluster_resources().get("CPU", 0.0)


def check_cpu_budget(ray_params: RayParams, available: float | None = None) -> None:
    """Fail fast when training workers plus Ray Data need more CPUs than the cluster has:
    otherwise the decode actors wait for a free CPU forever and training hangs."""
    available = cluster_cpus() if available is None else available
    r, need = ray_params, cpus_needed(ray_params)
    if need > available + 1e-9:
        raise ClusterError(
            f"ray.num_workers ({r.num_workers}) x ray.cpus_per_worker ({r.cpus_per_worker}) + ray.data_cpus "
            f"({r.data_cpus}) = {need:g} CPUs, but the Ray cluster has {available:g}: lower "
            "ray.cpus_per_worker or ray.data_cpus (fractions are fine, e.g. 0.75 and 0.5 on 2 cores)")


def worker_bundle(ray_params: RayParams) -> dict[str, float]:
    """What one training worker reserves on its node (its placement group bundle)."""
    return {"CPU": ray_params.cpus_per_worker, **({"GPU": 1.0} if ray_params.use_gpu else {})}


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of every alive node of the cluster this process is connected to."""
    import ray

    if not ray.is_initialized():
        raise ClusterError("not connected to Ray: call pipelines.train.cluster.connect first")
    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def workers_per_node(bundle: dict[str, float], node: dict[str, float]) -> int:
    return min(int(node.get(key, 0.0) / amount + 1e-9) for key, amount in bundle.items())


def check_placement(ray_params: RayParams, nodes: list[dict[str, float]] | None = None) -> None:
    """Fail fast when the alive nodes cannot hold the workers the way ray.placement_strategy
    places them: Ray would wait for a node that may never come.

    Every worker's bundle is the same, so what fits is a count: PACK and SPREAD take the
    workers each node holds, summed; STRICT_PACK the most one node holds; STRICT_SPREAD
    one per node that holds any.
    """
    nodes = alive_nodes() if nodes is None else nodes
    r, bundle = ray_params, worker_bundle(ray_params)
    each = [workers_per_node(bundle, node) for node in nodes]
    strategy = r.placement_strategy
    fits = {"PACK": sum(each), "SPREAD": sum(each), "STRICT_PACK": max(each, default=0),
            "STRICT_SPREAD": sum(1 for n in each if n)}[strategy]
    if fits >= r.num_workers:
        return
    n, wants = r.num_workers, " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    has = f"the Ray cluster has {len(nodes)} alive node{'s' if len(nodes) != 1 else ''} (" + "; ".join(
        ", ".join(f"{v:g} {k}" for k, v in sorted(node.items()) if k in bundle) or "nothing" for node in nodes) + ")"
    if strategy == "STRICT_PACK":
        why = (f"ray.placement_strategy STRICT_PACK puts all {n} workers, {wants} each, on one node; {has}, "
               f"room for {fits} on the largest")
        fix = "use PACK, a larger node, or fewer workers (ray.num_workers)"
    elif strategy == "STRICT_SPREAD":
        why = (f"ray.placement_strategy STRICT_SPREAD puts each of the {n} workers, {wants} each, on a node of its own; "
               f"{has}, room for {fits} that way")
        fix = "add nodes, use SPREAD, or fewer workers (ray.num_workers)"
    else:
        why = f"the {n} workers (ray.num_workers) need {wants} each; {has}, room for {fits}"
        fix = "add nodes, or lower ray.num_workers or ray.cpus_per_worker"
    raise ClusterError(f"{why}: {fix}")


def job_working_dir_copy() -> Path | None:
    """The temporary copy of the working directory this Ray job runs in, or None.

    `ray job submit --working-dir DIR` unpacks DIR on the head node into a directory
    named after the package its runtime environment names (gcs://_ray_pkg_<hash>.zip)
    and starts the entrypoint there; the copy is deleted after the job.
    """
    try:
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    package = str((job_config.get("runtime_env") or {}).get("working_dir") or "")
    name = Path(package.split("://")[-1]).stem
    if not name:
        return None
    cwd = Path.cwd().resolve()
    return next((d for d in (cwd, *cwd.parents) if d.name == name), None)


def paths_inside_job_copy(paths: dict[str, str]) -> list[str]:
    """The entries of {params key: local path} that lie in this Ray job's temporary copy."""
    copy = job_working_dir_copy()
    if copy is None:
        return []
    return [f"{key} ({path})" for key, path in paths.items()
            if "://" not in path and Path(path).resolve().is_relative_to(copy)]
