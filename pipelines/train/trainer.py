"""Training one stage on Ray Train: the driver, and the function each Ray Train worker runs.

    run_stage(params, stage, root)  resolve the start, name the run, open its MLflow run,
                                    train (or resume) on Ray Train, write the outputs

The run lives in <ray.storage_path>/<run name>, trained by one driver at a time
(pipelines.core.driver.hold_run). Workers are placed by ray.placement_strategy
(pipelines.train.cluster checks the alive nodes can hold them, before training and again
when a run fails), and each attempt's rank 0 prints the node every worker runs on.
Starting a stage again with the same
run name resumes from that run's last checkpoint (and its MLflow run); the default
name is pipelines.train.recipe.run_name, so an interrupted run resumes, a longer one
continues, and a changed one starts afresh. Every worker runs `train_loop`: the
stage's schedule of pipelines.train.loop, on its device (DDP, gloo on CPU and nccl on GPU,
mixed precision on GPU), fed by Ray Data (pipelines.data.dataset). After the run the best
checkpoint by mean IU becomes

    models/<stage>/               model.pt (plain state dict) + meta.json (with its MLflow run id)
    reports/<stage>/metrics.json  best val scores, iterations, where the weights started
    reports/<stage>/history.csv   iteration, loss and the four scores at each validation

and the history goes to the stage's MLflow run (pipelines.track.stage_runs) as it is, in memory.
Ctrl-C aborts the run through Ray Train, ends the MLflow run KILLED and raises
KeyboardInterrupt; a non-finite loss stops every worker (pipelines.train.loop) and fails
the stage without outputs.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fcn_models.checkpoint import META_FILE, MODEL_FILE
from fcn_models.metrics import MEAN_IU, SCORE_KEYS
from pipelines.core import driver
from pipelines.core.console import say
from pipelines.core.errors import StageError
from pipelines.core.files import atomic_write_text, replace_dir, write_json
from pipelines.core.params import Params
from pipelines.data import batches, dataset
from pipelines.track import metrics_log, stage_runs, store
from pipelines.train import cluster, loop, recipe, timing


def warn_random_init(stage: str, note: str) -> None:
    bar = "!" * 78
    print(
        f"\n{bar}\nWARNING: stage {stage} starts from RANDOM weights: {note}.\n"
        "The paper's FCNs start from ImageNet weights; expect far lower scores. Put the\n"
        "VGG16 classifier's state dict at model.imagenet_weights to train from it.\n"
        f"{bar}\n",
        file=sys.stderr, flush=True,
    )


# --------------------------------------------------------------------------- the worker side

def report_checkpoint(metrics: dict, rank: int, write) -> None:
    """Every rank reports (it is a barrier); only rank 0 attaches the checkpoint it writes."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="fcn-checkpoint-") as scratch:
        directory = Path(scratch) / "checkpoint"
        write(directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def report_placement(stage: str, rank: int, start: int) -> list[dict]:
    """Every worker's node, gathered over the process group; rank 0 prints them in one line
    (one line, not one a worker: Ray folds near-identical lines of several workers into one)."""
    import ray
    import torch.distributed as dist

    here = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address()}
    everyone = [here]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, here)
    if rank == 0:
        say(f"[{stage}] workers from iteration {start}: " + ", ".join(
            f"rank {w['rank']} on node {w['node_id']} ({w['ip']})" for w in everyone))
    return everyone


@dataclasses.dataclass(frozen=True)
class WorkerHandles:
    """What the workers get from this run beside the stage's StageConfig: where rank 0 logs
    (None: no MLflow run), the StopNotice actor, where loop.Trace records (None: off)."""
    tracking: metrics_log.RunTarget | None
    stop_notice: Any
    trace_dir: str | None = None


def worker_config(config: loop.StageConfig, handles: WorkerHandles) -> dict:
    """Ray Train's train_loop_config for train_loop: a dict, as Ray Train takes it."""
    return {"stage": config, "handles": handles}


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker: pipelines.train.loop's schedule with Ray's device, DDP, data and reports."""
    import ray
    import ray.train
    import ray.train.torch

    config: loop.StageConfig = loop_config["stage"]
    handles: WorkerHandles = loop_config["handles"]
    run_id = handles.tracking.run_id if handles.tracking else None
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            worker = loop.StageWorker(config, device, rank, wrap=ray.train.torch.prepare_model,
                                      checkpoint_dir=Path(directory), run_id=run_id)
    else:
        worker = loop.StageWorker(config, device, rank, wrap=ray.train.torch.prepare_model, run_id=run_id)
    report_placement(config.stage, rank, worker.start)
    if rank == 0 and worker.use_amp:
        say(f"[{config.stage}] steps and validation under {str(worker.amp_dtype).removeprefix('torch.')} "
            f"autocast on {device.type}")
    params = config.params
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    # One pass over the shard holds every epoch this attempt needs (dataset.training_datasets
    # plans them from the checkpoint it resumed from).
    train_batches = iter(batches.iter_train_batches(train_shard, params, worker.start))
    try:
        loop.run(worker, train_batches, batches.ValBatches(val_shard, params, all_agree=loop.all_agree(device)),
                 lambda row, write: report_checkpoint(row, rank, write),
                 metrics_log.MetricsLog(handles.tracking, rank, config.stage), trace_dir=handles.trace_dir)
    except loop.NonFiniteLoss as stop:
        # Every worker stops here, at the same iteration. Raised on, it would be a worker
        # failure, which Ray Train retries from the last checkpoint into the same loss.
        if rank == 0:
            ray.get(handles.stop_notice.put.remote(stop.as_dict()))


class StopNotice:
    """Why the workers stopped early (a NonFiniteLoss as a dict), kept for the driver: a Ray
    actor, since a report without a checkpoint never reaches the run's result."""

    def __init__(self):
        self.notice = None

    def put(self, notice: dict) -> None:
        self.notice = notice

    def get(self) -> dict | None:
        return self.notice


# --------------------------------------------------------------------------- the driver

def storage_path(params: Params) -> str:
    """ray.storage_path as Ray Train takes it: an absolute local path or a URI."""
    return str(params.ray.storage_path)


def check_outputs_outside_job_copy(params: Params) -> None:
    """Refuse to write outputs into a Ray job's copy of the working directory, where they would be lost."""
    outputs = {"train.models_dir": params.train.models_dir, "train.reports_dir": params.train.reports_dir,
               "ray.storage_path": params.ray.storage_path}
    uri = store.tracking_uri(params)
    if uri.startswith("sqlite:///"):
        outputs["mlflow.db_file"] = uri[len("sqlite:///"):]
        outputs["mlflow.artifacts_dir"] = params.mlflow.artifacts_dir
    inside = cluster.paths_inside_job_copy(outputs)
    if inside:
        raise StageError(
            f"{', '.join(inside)} would be written inside this Ray job's temporary copy of the working "
            f"directory ({cluster.job_working_dir_copy()}) and lost when the job ends: pass the project's params "
            "file by its absolute path (`ray job submit --working-dir . -- python -m pipelines.stages.train "
            "--params \"$PWD/params.yaml\" ...`), on storage every node reaches, or give those paths as absolute "
            "paths or s3:// URIs")


def run_dir(storage: str, name: str) -> str:
    """Where Ray Train keeps run `name` (its checkpoints) in `storage`, a path or a URI."""
    return f"{storage.rstrip('/')}/{name}"


def run_stage(params: Params, stage: str, root: Path, run_name: str | None = None,
              trace_dir: str | None = None, init: recipe.StageInit | None = None) -> dict:
    """Train one stage on Ray, write its outputs and track it in MLflow; return the metrics written.

    root: the project (where the params file is): its git state and dvc.lock are recorded.
    trace_dir: where loop.Trace records attempts and steps (`fcn train --trace-dir`); None: off.
    init: where the weights start when not in params' train.models_dir (`fcn seeds` writes to
    a models_dir of its own and starts from the pipeline's checkpoint); None: resolve_init's.
    """
    root = Path(root).resolve()
    init = init or recipe.resolve_init(params, stage)
    if init.source == "random":
        warn_random_init(stage, init.note)
    name = run_name or recipe.run_name(params, stage, init, root)
    storage = storage_path(params)
    # One run, one driver: a second one stops here (driver.RunHeldError), before it
    # touches the run or its MLflow run.
    with driver.hold_run(storage, name):
        return _run_held(params, stage, root, init, name, storage, trace_dir)


def _run_held(params: Params, stage: str, root: Path, init: recipe.StageInit, name: str, storage: str,
              trace_dir: str | None) -> dict:
    config = loop.stage_config(params, stage, init)
    # Fewer iterations than the run has trained cannot be had by resuming it: its best
    # checkpoint may come from past the count asked for, and the outputs would say otherwise.
    where = run_dir(storage, name)
    done = dataset.checkpoint_iteration(where)
    if done > config.iterations:
        derived = config.scaling
        asks = (f"train.stages.{stage}.iterations asks for" if derived.rule == "none" else
                f"train.stages.{stage}.iterations ({derived.base_iterations}) makes at global batch "
                f"{derived.global_batch} (train.scaling {derived.rule})")
        raise StageError(
            f"run {name} has trained {done} iterations ({where}), more than the {config.iterations} "
            f"that {asks}. Ask for {derived.asked_iterations(done)} or more to use it, or train "
            f"{config.iterations} afresh under another run name (--run-name) or after removing {where}")
    # Build the starting network once here, so a bad init fails now with its own
    # message instead of in every worker attempt.
    loop.initial_model(config)
    # The stage's MLflow run opens before anything trains: a store that cannot be
    # opened stops the stage here (pipelines/track/stage_runs.py says why).
    try:
        stage_run = stage_runs.open_stage_run(params, stage, root, name, storage, init,
                                                recipe.stage_params(params, stage, init))
    except store.TrackingError as err:
        raise StageError(str(err)) from None
    try:
        joining = time.perf_counter()
        cluster.connect(params.ray)
        join_ray_s = time.perf_counter() - joining
        result = fit(params, name, storage, config, stage_run.for_workers(), trace_dir)
        writing = time.perf_counter()
        best, history = best_and_history(result)
        models_dir = Path(params.train.models_dir) / stage
        reports_dir = Path(params.train.reports_dir) / stage
        outputs = write_outputs(best, history, models_dir, reports_dir, init.note)
        metrics = json.loads(outputs["metrics.json"])
        # How long it took decides nothing: beside the reports, not in them.
        write_json(reports_dir / timing.TIMING_FILE,
                   timing.stage_timing(join_ray_s, history, time.perf_counter() - writing))
        try:
            stage_runs.finish_stage_run(stage_run, params, stage, models_dir, history, outputs)
        except Exception as err:
            raise StageError(
                f"stage {stage} trained and wrote its outputs, but logging them to MLflow run {stage_run.run_id} "
                f"failed: {type(err).__name__}: {err}; once the store works, run the stage again with the same "
                "run name: it has nothing left to train and logs what is missing") from err
    except BaseException as err:
        stage_runs.end_stage_run(stage_run, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    return metrics


def fit(params: Params, name: str, storage: str, config: loop.StageConfig,
        tracking: metrics_log.RunTarget | None = None, trace_dir: str | None = None):
    """Run (or resume) the Ray Train run `name` in `storage`, rank 0 logging to `tracking`;
    return its result. StageError when the workers stopped on a non-finite loss."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipelines.train.rendezvous import LoopbackTorchConfig

    cluster.connect(params.ray)
    cluster.check_cpu_budget(params.ray)
    cluster.check_placement(params.ray)
    print(f"[{config.stage}] run {name} in {storage}; weights start from {config.init.note}", flush=True)
    print(f"[{config.stage}] {config.scaling.note}", flush=True)
    ray_params = params.ray
    # On the driver's node: an actor on a worker node would die with that node and take
    # the driver's answer with it, though the run itself survives the loss.
    notice = ray.remote(num_cpus=0)(StopNotice).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote()
    trainer = interruptible(TorchTrainer)(
        train_loop,
        train_loop_config=worker_config(config, WorkerHandles(tracking, notice, trace_dir)),
        # On a local cluster the process group listens on 127.0.0.1 only.
        torch_config=LoopbackTorchConfig(backend="nccl" if ray_params.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=ray_params.num_workers, use_gpu=ray_params.use_gpu,
            resources_per_worker=cluster.worker_bundle(ray_params),
            placement_strategy=ray_params.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            # A worker group that cannot start (a lost node took the room it needs) is
            # retried as often as a failed worker, not forever.
            failure_config=ray.train.FailureConfig(max_failures=ray_params.max_failures,
                                                   controller_failure_limit=ray_params.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=params.train.checkpoints_to_keep,
                checkpoint_score_attribute=MEAN_IU, checkpoint_score_order="max",
            ),
        ),
        datasets=dataset.training_datasets(params, config.iterations, run_dir(storage, name)),
        dataset_config=dataset.data_config(params),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        # After a lost node, say what the cluster lacks rather than Ray's timeout.
        try:
            cluster.check_placement(ray_params)
        except cluster.ClusterError as short:
            raise cluster.ClusterError(
                f"stage {config.stage} stopped, the Ray cluster can no longer hold its workers: {short}. "
                f"Its checkpoints stay in {run_dir(storage, name)}: once the cluster has room, run the stage "
                "again and it resumes from the last one") from err
        raise
    stopped = ray.get(notice.get.remote())
    if stopped:
        where = result.checkpoint.path if result.checkpoint is not None else None
        raise StageError(f"{loop.NonFiniteLoss.from_dict(stopped, where)}. Nothing was written to "
                         f"{Path(params.train.models_dir) / config.stage}")
    return result


def interruptible(trainer_class):
    """`trainer_class` whose fit() raises KeyboardInterrupt on Ctrl-C.

    Ray Train's fit() installs its own SIGINT handler: it aborts the run (workers
    stopped, the run's checkpoints kept) and then leaves by sys.exit(0) or returns as
    if the run had ended, so the caller never learns of the interrupt. This keeps
    Ray's abort, then raises KeyboardInterrupt; a second Ctrl-C raises it at once.
    The handler in place before fit() is back afterwards.
    """
    import signal

    class Interruptible(trainer_class):
        def _register_sigint_handler(self, controller):
            super()._register_sigint_handler(controller)
            abort_run = signal.getsignal(signal.SIGINT)
            interrupted = []

            def on_sigint(signum, frame):
                if interrupted:
                    raise KeyboardInterrupt
                interrupted.append(signum)
                try:
                    abort_run(signum, frame)
                except SystemExit:
                    pass
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

        def fit(self):
            previous = signal.getsignal(signal.SIGINT)
            try:
                return super().fit()
            finally:
                signal.signal(signal.SIGINT, previous)

    return Interruptible


def best_and_history(result) -> tuple[Path, list[dict]]:
    """A local copy of the run's best checkpoint (by mean IU) and the run's whole history
    (the latest checkpoint carries all of it; the best one only up to itself)."""
    if not result.best_checkpoints:
        raise StageError(f"run at {result.path} reported no checkpoint")
    best = result.get_best_checkpoint(metric=MEAN_IU, mode="max")
    with result.checkpoint.as_directory() as directory:
        history = loop.read_history(Path(directory))
    scratch = Path(tempfile.mkdtemp(prefix="fcn-best-"))
    with best.as_directory() as directory:
        for file in (MODEL_FILE, META_FILE):
            shutil.copy2(Path(directory) / file, scratch / file)
    return scratch, history


def write_outputs(best: Path, history: list[dict], models_dir: Path, reports_dir: Path,
                  init_note: str) -> dict[str, str]:
    """Best checkpoint -> models/<stage>; its scores -> metrics.json; the run's history -> history.csv.
    Returns {file name: text} of the two reports."""
    meta = json.loads((best / META_FILE).read_text())
    models_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=models_dir.parent, prefix=f".{models_dir.name}."))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
    try:
        for name in (MODEL_FILE, META_FILE):
            shutil.copy2(best / name, staging / name)
        replace_dir(staging, models_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(best, ignore_errors=True)
    metrics = {
        **{k: meta["val"][k] for k in SCORE_KEYS},
        "best_iteration": meta["iterations"],
        "iterations": history[-1]["iteration"],
        "init": init_note,
    }
    outputs = {"metrics.json": json.dumps(metrics, indent=2) + "\n", metrics_log.HISTORY_CSV: history_csv(history)}
    for name, text in outputs.items():
        atomic_write_text(reports_dir / name, text)
    return outputs


def history_csv(history: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=loop.HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in loop.HISTORY_COLUMNS} for row in history)
    return buffer.getvalue()
