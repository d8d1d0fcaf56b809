"""Train stage: one stage of the FCN schedule on Ray Train.

    python -m pipelines.train --stage fcn32s|fcn16s|fcn8s|fcn8s-atonce|fcn32s-fixed

Each invocation trains one stage. FCN-32s (and at-once FCN-8s, and FCN-32s-fixed)
start from the ImageNet classifier; FCN-16s from FCN-32s's best checkpoint in
models/fcn32s, FCN-8s from FCN-16s's. The driver resolves where the weights come
from, connects to Ray and runs a TorchTrainer; every worker runs `train_loop`
(DDP, gloo on CPU and nccl on GPU, mixed precision on GPU), validates on its share
of val every `train.val_every` iterations and at the end, merges the confusion
matrices of all workers, and reports a checkpoint. After the run the best
checkpoint by mean IU becomes

    models/<stage>/               model.pt (plain state dict) + meta.json
    reports/<stage>/metrics.json  best val scores, iterations, where the weights started
    reports/<stage>/history.csv   iteration, loss and the four scores at each validation

and the stage is one MLflow run (pipelines/tracking.py): params, provenance tags,
metrics by iteration from rank 0, plots and val images of the best checkpoint.

A run lives in <ray.storage_path>/<run name>. Starting a stage again with the same
run name resumes from that run's last checkpoint (and its MLflow run); the default
name is the stage plus a fingerprint of everything that decides its result except
the iteration count (parameters, code, shards, starting weights), so an
interrupted run resumes, a longer one continues, and a changed one starts afresh.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fcn_models.checkpoint import load_checkpoint, save_checkpoint
from fcn_models.fcn import build_fcn, reference_param_groups
from fcn_models.metrics import IGNORE_INDEX, ConfusionMatrix
from fcn_models.surgery import load_imagenet_weights, transfer_weights
from pipelines import tracking
from pipelines.files import atomic_write_text
from pipelines.params import PROJECT_ROOT, Params, ParamsError, load_params, resolve

VARIANTS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce")
# The layer that learns in a "fixed" stage (the paper's FCN-32s-fixed row).
FIXED_STAGE_LEARNS = "score_fr"
SCORE_KEYS = ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")
HISTORY_COLUMNS = ("iteration", "loss", *SCORE_KEYS)
TRAIN_STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


class TrainError(RuntimeError):
    """A stage that cannot run as configured; the message says what to do."""


# ---------------------------------------------------------------------------
# Optimisation: which parameters learn, at which rate, and the loss.


def freeze_for_stage(model: nn.Module, fixed: bool) -> None:
    """Set requires_grad for a stage.

    Upsampling (transposed convolutions, bilinear-initialised) stays fixed as in
    the reference. A fixed stage trains only the final score layer.
    """
    for name, param in model.named_parameters():
        param.requires_grad = (name.split(".")[0] == FIXED_STAGE_LEARNS) if fixed else True
    for module in model.modules():
        if isinstance(module, nn.ConvTranspose2d):
            module.requires_grad_(False)


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                   kind: str = "sgd") -> torch.optim.Optimizer:
    """SGD as the reference: weights at lr with decay, biases at 2 x lr without.

    kind "adam" keeps the same groups with Adam (momentum as its beta1), for nets
    that start from random weights. Only parameters that require a gradient are in
    a group, so momentum and weight decay cannot move frozen ones.
    """
    groups = [g for g in reference_param_groups(model, lr, weight_decay) if g["params"]]
    if not groups:
        raise TrainError("no parameter of the model requires a gradient: nothing to train")
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(momentum, 0.999))
    raise TrainError(f"train.optimizer {kind!r}: expected 'sgd' or 'adam'")


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Pixel-wise cross entropy, ignore label 255 skipped.

    "sum" adds over the valid pixels (the reference: batch 1, summed, hence its tiny
    learning rates); "mean" divides by the number of valid pixels, and is 0 (not NaN)
    for a batch with none.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"loss reduction {reduction!r}: expected 'sum' or 'mean'")
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    valid = (labels != IGNORE_INDEX).sum()
    return total / valid.clamp(min=1)


# ---------------------------------------------------------------------------
# Validation: a confusion matrix per worker, summed over all of them.


@torch.no_grad()
def confusion_matrix(model: nn.Module, batches, num_classes: int, device: torch.device) -> ConfusionMatrix:
    """Score (images, labels) batches with the model in eval mode."""
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    for images, labels in batches:
        logits = model(images.to(device, non_blocking=True))
        matrix.update(logits.argmax(1), labels)
    model.train(was_training)
    return matrix


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a tensor over every worker (identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    # nccl reduces only device tensors; gloo takes CPU ones.
    on_device = values.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


def merge_confusion(matrix: ConfusionMatrix, device: torch.device) -> ConfusionMatrix:
    summed = all_reduce_sum(torch.from_numpy(matrix.matrix.copy()), device)
    return ConfusionMatrix(matrix.num_classes, matrix.ignore_index, summed.numpy())


# ---------------------------------------------------------------------------
# Stages: the variant, and where its weights start.


def stage_variant(stage: str) -> str:
    """The network a stage trains: its name, without a "-fixed" suffix."""
    variant = stage[: -len("-fixed")] if stage.endswith("-fixed") else stage
    if variant not in VARIANTS:
        raise TrainError(
            f"stage {stage!r}: cannot tell its network; name a stage after one of "
            f"{', '.join(VARIANTS)} (optionally with '-fixed')"
        )
    return variant


def stage_command(stage: str) -> str:
    return f"`python -m pipelines.train --stage {stage}` (or `dvc repro train@{stage}`)"


def resolve_init(params: Params, stage: str, root: Path) -> dict:
    """Where a stage's weights start: {"source", "path", "note"}.

    source is "imagenet", "random" (ImageNet weights asked for but absent: loudly
    warned about, and recorded in the stage's outputs) or an earlier stage's name.
    """
    init = params.train.stages[stage].init
    if init != "imagenet":
        path = resolve(params.train.models_dir, root) / init
        if not (path / "model.pt").is_file() or not (path / "meta.json").is_file():
            raise TrainError(
                f"stage {stage} starts from {init}'s best checkpoint, but {path} holds none "
                f"(model.pt and meta.json): run {stage_command(init)} first"
            )
        return {"source": init, "path": str(path), "note": f"{init} ({path})"}
    weights = params.model.imagenet_weights
    path = resolve(weights, root) if weights else None
    if path is not None and path.is_file():
        return {"source": "imagenet", "path": str(path), "note": f"imagenet ({path})"}
    where = str(path) if path else "model.imagenet_weights (null)"
    return {"source": "random", "path": None, "note": f"random (imagenet weights not found at {where})"}


def warn_random_init(stage: str, note: str) -> None:
    bar = "!" * 78
    print(
        f"\n{bar}\nWARNING: stage {stage} starts from RANDOM weights: {note}.\n"
        "The paper's FCNs start from ImageNet weights; expect far lower scores. Put the\n"
        "VGG16 classifier's state dict at model.imagenet_weights to train from it.\n"
        f"{bar}\n",
        file=sys.stderr, flush=True,
    )


def initial_model(config: dict) -> nn.Module:
    """The network a stage starts from, on the CPU, with its starting weights."""
    norm, init = config["input_norm"], config["init"]
    model = build_fcn(config["variant"], backbone=config["backbone"], num_classes=config["num_classes"],
                      width=config["width"], input_norm=norm)
    try:
        if init["source"] == "imagenet":
            load_imagenet_weights(model, init["path"], norm=norm)
        elif init["source"] != "random":
            previous, _ = load_checkpoint(init["path"])
            if previous.input_norm.name != norm:
                raise ValueError(f"its weights expect input normalisation {previous.input_norm.name!r}, "
                                 f"params say model.input_norm {norm!r}")
            transfer_weights(previous, model)
    except (ValueError, KeyError, FileNotFoundError) as err:
        fix = ("retrain " + init["source"] + " with the current model.* params" if init["source"] != "imagenet"
               else "give model.imagenet_weights a torchvision state dict for this backbone at width 1.0")
        raise TrainError(f"cannot start {config['stage']} from {init['note']}: {err}; {fix}") from None
    return model


# ---------------------------------------------------------------------------
# Checkpoints: model.pt + meta.json (the stage output format) plus what resuming needs.


def checkpoint_meta(config: dict, iteration: int, scores: dict, matrix: ConfusionMatrix) -> dict:
    return {
        "stage": config["stage"],
        "init": config["init"]["note"],
        "iterations": iteration,
        "val": {**{k: scores[k] for k in SCORE_KEYS},
                # NaN (a class in neither truth nor prediction) is no JSON: null.
                "per_class_iu": [None if math.isnan(v) else v for v in scores["per_class_iu"]]},
        "confusion_matrix": matrix.matrix.tolist(),
    }


def save_training_checkpoint(directory: Path, model: nn.Module, meta: dict, optimizer, scaler,
                             iteration: int, history: list[dict]) -> None:
    save_checkpoint(directory, model, meta)
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration},
               Path(directory) / TRAIN_STATE_FILE)
    (Path(directory) / HISTORY_FILE).write_text(json.dumps(history))


def load_training_checkpoint(directory: Path, model: nn.Module) -> dict:
    """Load model weights into `model`; return the optimizer/scaler state, iteration and history."""
    saved, _ = load_checkpoint(directory)
    model.load_state_dict(saved.state_dict())
    state = torch.load(Path(directory) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    state["history"] = json.loads((Path(directory) / HISTORY_FILE).read_text())
    return state


# ---------------------------------------------------------------------------
# The loop every Ray Train worker runs.


def say(line: str) -> None:
    """One progress line on stdout. Inside a Ray Train worker, print() is patched to
    also go through logging, which shows every line twice; a plain write does not."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class ProgressLog:
    """Plain-text trace of a run's attempts and iterations in <run dir>/progress.

    workers.jsonl: one line per worker and attempt (rank, pid, start iteration), so
    a tool can find the worker processes; iterations.log (rank 0): "start A I" when
    attempt A begins after iteration I, "A I" after each iteration, "checkpoint A I"
    once a checkpoint is reported. A resumed run shows exactly which steps were redone.
    """

    def __init__(self, directory: str | None, rank: int):
        self.directory = Path(directory) if directory else None
        self.rank = rank
        self.attempt = 0
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, line: str) -> None:
        with open(self.directory / name, "a") as fh:
            fh.write(line + "\n")

    def start(self, start_iteration: int) -> None:
        if not self.directory:
            return
        self._append("workers.jsonl", json.dumps(
            {"rank": self.rank, "pid": os.getpid(), "start_iteration": start_iteration}))
        if self.rank == 0:
            log = self.directory / "iterations.log"
            previous = log.read_text().splitlines() if log.exists() else []
            self.attempt = 1 + sum(line.startswith("start ") for line in previous)
            self._append("iterations.log", f"start {self.attempt} {start_iteration}")

    def iteration(self, iteration: int) -> None:
        if self.directory and self.rank == 0:
            self._append("iterations.log", f"{self.attempt} {iteration}")

    def checkpoint(self, iteration: int) -> None:
        if self.directory and self.rank == 0:
            self._append("iterations.log", f"checkpoint {self.attempt} {iteration}")


def endless(epoch_batches, what: str):
    """Batches from epoch_batches(0), then epoch_batches(1), ... without end."""
    epoch = 0
    while True:
        count = 0
        for batch in epoch_batches(epoch):
            count += 1
            yield batch
        if count == 0:
            raise TrainError(f"the {what} shard of this worker is empty: use more images or fewer workers")
        epoch += 1


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from pipelines import dataset

    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    use_amp = bool(config["amp"]) and device.type == "cuda"
    progress = ProgressLog(config.get("progress_dir"), rank)
    metrics_log = tracking.MetricsLog(config.get("tracking"), rank, config["stage"])

    # Same seed on every rank: identical starting weights (DDP also broadcasts rank 0's).
    torch.manual_seed(config["seed"])
    net = initial_model(config)
    freeze_for_stage(net, config["fixed"])
    start, history, train_state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            train_state = load_training_checkpoint(Path(directory), net)
        start, history = train_state["iteration"], train_state["history"]
    # Dropout streams differ per rank and depend only on where this attempt starts.
    torch.manual_seed(config["seed"] + 1_000_003 * rank + start)

    model = ray.train.torch.prepare_model(net)
    optimizer = make_optimizer(net, config["lr"], config["momentum"], config["weight_decay"], config["optimizer"])
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    if train_state:
        # After prepare_model: load_state_dict moves the momentum buffers to the parameters' device.
        optimizer.load_state_dict(train_state["optimizer"])
        scaler.load_state_dict(train_state["scaler"])
    progress.start(start)
    metrics_log.resume(history)

    iterations, val_every = config["iterations"], config["val_every"]
    if start >= iterations and rank == 0:
        say(f"[{config['stage']}] run already at iteration {start} (asked for {iterations}): nothing to train")
    params = config["params"]
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    # One pass over the shard holds every epoch this attempt needs (dataset.training_datasets
    # plans them from the checkpoint it resumed from); a second pass would replay them.
    batches = endless(lambda _pass: dataset.iter_train_batches(train_shard, params, start), "train")
    # Kept on the device: a .item() every step would stall a GPU.
    loss_sum, loss_count = torch.zeros((), dtype=torch.float64, device=device), 0
    tick, tick_iteration = time.perf_counter(), start
    model.train()
    for iteration in range(start + 1, iterations + 1):
        images, labels = next(batches)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(images)
        loss = segmentation_loss(logits, labels, config["loss"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum, loss_count = loss_sum + loss.detach(), loss_count + 1
        progress.iteration(iteration)

        if rank == 0 and (iteration % config["log_every"] == 0 or iteration == iterations):
            now = time.perf_counter()
            rate = (iteration - tick_iteration) / max(now - tick, 1e-9)
            tick, tick_iteration = now, iteration
            loss_value = loss.item()
            say(f"[{config['stage']}] iteration {iteration}/{iterations}  loss {loss_value:.4g}  {rate:.2f} it/s")
            metrics_log.train_loss(iteration, loss_value)

        if iteration % val_every == 0 or iteration == iterations:
            # The raw module, not DDP: workers score different numbers of images.
            matrix = merge_confusion(
                confusion_matrix(net, dataset.iter_val_batches(val_shard, params), config["num_classes"], device),
                device,
            )
            if matrix.total == 0:
                raise TrainError("validation scored no pixel: the val shards are empty or all ignore label")
            totals = all_reduce_sum(torch.stack([loss_sum.cpu(), torch.tensor(float(loss_count), dtype=torch.float64)]),
                                    device)
            scores = matrix.scores()
            row = {"iteration": iteration, "loss": float(totals[0] / totals[1]),
                   **{k: scores[k] for k in SCORE_KEYS}}
            history.append(row)
            loss_sum, loss_count = torch.zeros_like(loss_sum), 0
            if rank == 0:
                say(f"[{config['stage']}] val at {iteration}: " + "  ".join(f"{k} {row[k]:.4f}" for k in SCORE_KEYS))
            report_checkpoint(row, rank, lambda directory: save_training_checkpoint(
                directory, net, checkpoint_meta(config, iteration, scores, matrix), optimizer, scaler,
                iteration, history))
            progress.checkpoint(iteration)
            # After the report: a validation redone after a failure is then one whose
            # checkpoint never registered, and logging skips steps already logged.
            metrics_log.validation(row)
            model.train()


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


# ---------------------------------------------------------------------------
# The driver: Ray cluster, trainer, outputs.


def _bind_loopback() -> None:
    """Make a local Ray cluster listen on 127.0.0.1 only.

    Ray binds its node to the machine's routable address unless told it is not a
    cluster; this flag (read by Ray and by every process it starts) says so.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect_ray(ray_params) -> None:
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
    _bind_loopback()
    # Enough logical CPUs for the training workers plus Ray Data's tasks, even on a
    # small machine: otherwise data tasks wait forever for a free CPU.
    needed = math.ceil(ray_params.num_workers * ray_params.cpus_per_worker + ray_params.data_cpus)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False)


def _sha1_files(paths) -> str:
    digest = hashlib.sha1()
    for path in sorted(paths):
        digest.update(str(path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def default_run_name(params: Params, stage: str, init: dict, root: Path) -> str:
    """<stage>-<fingerprint of everything deciding the result but the iteration count>."""
    stage_params = dataclasses.asdict(params.train.stages[stage])
    stage_params.pop("iterations")
    train = {k: v for k, v in dataclasses.asdict(params.train).items()
             if k not in ("stages", "iterations", "val_every", "checkpoints_to_keep", "log_every",
                          "models_dir", "reports_dir")}
    shards = resolve(params.data.shards_dir, root)
    shard_files = sorted(shards.rglob("*.parquet")) if shards.is_dir() else []
    if init["path"] is None:
        init_identity = init["source"]
    elif init["source"] == "imagenet":
        init_identity = f"{init['path']}:{Path(init['path']).stat().st_size}"
    else:
        # The weights themselves: an earlier stage retrained to the same scores has
        # the same meta.json, yet this stage must start afresh from its new weights.
        init_identity = _sha1_files([Path(init["path"]) / "meta.json", Path(init["path"]) / "model.pt"])
    code = [PROJECT_ROOT / "pipelines" / "train.py", PROJECT_ROOT / "pipelines" / "dataset.py",
            *(PROJECT_ROOT / "fcn_models").glob("*.py")]
    fingerprint = {
        "stage": stage_params, "train": train,
        "model": dataclasses.asdict(params.model), "augment": dataclasses.asdict(params.augment),
        "workers": params.ray.num_workers, "gpu": params.ray.use_gpu, "init": init_identity,
        "shards": [(str(p.relative_to(shards)), p.stat().st_size) for p in shard_files],
        "code": _sha1_files([p for p in code if p.is_file()]),
    }
    digest = hashlib.sha1(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
    return f"{stage}-{digest[:10]}"


def loop_config(params: Params, stage: str, init: dict, progress_dir: str | None) -> dict:
    """Everything a worker needs, as plain data; every path absolute."""
    train, stage_params = params.train, params.train.stages[stage]
    return {
        "stage": stage, "variant": stage_variant(stage), "init": init,
        "backbone": params.model.backbone, "width": params.model.width, "num_classes": params.model.num_classes,
        "input_norm": params.model.input_norm,
        "fixed": stage_params.fixed, "lr": stage_params.lr, "iterations": stage_params.iterations,
        "seed": train.seed, "loss": train.loss, "optimizer": train.optimizer, "momentum": train.momentum,
        "weight_decay": train.weight_decay,
        "amp": train.amp, "val_every": train.val_every, "log_every": train.log_every,
        # The data helpers read the model, augment and train sections.
        "params": params,
        "progress_dir": progress_dir,
        # The stage's MLflow run (tracking.StageRun.for_workers()), set by run_stage.
        "tracking": None,
    }


def run_stage(params: Params, stage: str, root: Path = PROJECT_ROOT, run_name: str | None = None) -> dict:
    """Train one stage on Ray, write its outputs and track it in MLflow; return the metrics written."""
    if stage not in params.train.stages:
        raise TrainError(f"unknown stage {stage!r}: train.stages has {', '.join(params.train.stages)}")
    root = Path(root).resolve()
    init = resolve_init(params, stage, root)
    if init["source"] == "random":
        warn_random_init(stage, init["note"])
    name = run_name or default_run_name(params, stage, init, root)
    storage = str(params.ray.storage_path)
    if "://" not in storage:
        storage = str(resolve(storage, root))
    progress_dir = None if "://" in storage else str(Path(storage) / name / "progress")
    config = loop_config(params, stage, init, progress_dir)
    # Build the starting network once here, so a bad init fails now with its own
    # message instead of in every worker attempt.
    initial_model(config)
    # The stage's MLflow run opens before anything trains: a store that cannot be
    # opened stops the stage here (pipelines/tracking.py says why).
    try:
        stage_run = tracking.open_stage_run(params, stage, root, name, storage, init["note"])
    except tracking.TrackingError as err:
        raise TrainError(str(err)) from None
    config["tracking"] = stage_run.for_workers()
    try:
        models_dir = resolve(params.train.models_dir, root) / stage
        reports_dir = resolve(params.train.reports_dir, root) / stage
        metrics = write_outputs(fit(params, name, storage, config, root), models_dir, reports_dir, init["note"])
        try:
            tracking.finish_stage_run(stage_run, params, stage, root, models_dir, reports_dir)
        except Exception as err:
            raise TrainError(
                f"stage {stage} trained and wrote its outputs, but logging them to MLflow run {stage_run.run_id} "
                f"failed: {type(err).__name__}: {err}; once the store works, run the stage again with the same "
                "run name: it has nothing left to train and logs what is missing") from err
    except BaseException as err:
        tracking.end_stage_run(stage_run, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    return metrics


def fit(params: Params, name: str, storage: str, config: dict, root: Path):
    """Run (or resume) the Ray Train run `name` in `storage`; return its result."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines import dataset

    connect_ray(params.ray)
    print(f"[{config['stage']}] run {name} in {storage}; weights start from {config['init']['note']}", flush=True)
    ray_params = params.ray
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if ray_params.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=ray_params.num_workers, use_gpu=ray_params.use_gpu,
            resources_per_worker={"CPU": ray_params.cpus_per_worker, **({"GPU": 1} if ray_params.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=ray_params.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=params.train.checkpoints_to_keep,
                checkpoint_score_attribute="mean_iu", checkpoint_score_order="max",
            ),
        ),
        datasets=dataset.training_datasets(params, root, config["iterations"], f"{storage.rstrip('/')}/{name}"),
        dataset_config=dataset.data_config(params),
    )
    return trainer.fit()


def _replace_dir(source: Path, target: Path) -> None:
    """Copy a directory into place: a temp sibling first, then renames, never a half-written target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
    try:
        for name in ("model.pt", "meta.json"):
            shutil.copy2(source / name, staging / name)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_outputs(result, models_dir: Path, reports_dir: Path, init_note: str) -> dict:
    """Best checkpoint -> models/<stage>; its scores -> metrics.json; the run's history -> history.csv."""
    if not result.best_checkpoints:
        raise TrainError(f"run at {result.path} reported no checkpoint")
    best = result.get_best_checkpoint(metric="mean_iu", mode="max")
    with best.as_directory() as directory:
        meta = json.loads((Path(directory) / "meta.json").read_text())
        _replace_dir(Path(directory), models_dir)
    # The latest checkpoint carries the whole history (the best one only up to itself).
    with result.checkpoint.as_directory() as directory:
        history = json.loads((Path(directory) / HISTORY_FILE).read_text())
    metrics = {
        **{k: meta["val"][k] for k in SCORE_KEYS},
        "best_iteration": meta["iterations"],
        "iterations": history[-1]["iteration"],
        "init": init_note,
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in HISTORY_COLUMNS} for row in history)
    atomic_write_text(reports_dir / "history.csv", buffer.getvalue())
    atomic_write_text(reports_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


# ---------------------------------------------------------------------------
# The command line, also as the entrypoint of a Ray job.


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


def check_outputs_outside_job_copy(params: Params, root: Path) -> None:
    """Refuse to write outputs into a Ray job's copy of the working directory, where they would be lost."""
    copy = job_working_dir_copy()
    if copy is None:
        return
    outputs = {"train.models_dir": params.train.models_dir, "train.reports_dir": params.train.reports_dir}
    if "://" not in str(params.ray.storage_path):
        outputs["ray.storage_path"] = params.ray.storage_path
    uri = tracking.tracking_uri(params, root)
    if uri.startswith("sqlite:///"):
        outputs["mlflow.db_file"] = uri[len("sqlite:///"):]
        outputs["mlflow.artifacts_dir"] = params.mlflow.artifacts_dir
    inside = [f"{key} ({resolve(path, root)})" for key, path in outputs.items()
              if resolve(path, root).resolve().is_relative_to(copy)]
    if inside:
        raise TrainError(
            f"{', '.join(inside)} would be written inside this Ray job's temporary copy of the working "
            f"directory ({copy}) and lost when the job ends: pass the project's params file by its absolute "
            "path (`ray job submit --working-dir . -- python -m pipelines.train --params \"$PWD/params.yaml\" ...`), "
            "on storage every node reaches, or give those paths as absolute paths or s3:// URIs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn train", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, help="the stage to train: a key of train.stages in params")
    parser.add_argument("--params", default="params.yaml",
                        help="params file; relative paths in it are taken from its directory, so outputs land "
                             "there: in a Ray job, give the project's file by absolute path (default: %(default)s)")
    parser.add_argument("--run-name", default=None,
                        help="Ray Train run name; a run with this name resumes from its last checkpoint "
                             "(default: the stage and a fingerprint of its parameters, code, data and init)")
    args = parser.parse_args(argv)
    from ray.train import TrainingFailedError

    try:
        params = load_params(args.params)
        root = Path(args.params).resolve().parent
        check_outputs_outside_job_copy(params, root)
        metrics = run_stage(params, args.stage, root, args.run_name)
    except (ParamsError, TrainError) as err:
        print(f"train: {err}", file=sys.stderr)
        return 2 if isinstance(err, ParamsError) else 1
    except TrainingFailedError as err:
        print(f"train: stage {args.stage} failed after ray.max_failures retries: {err}\n"
              "Running it again with the same run name resumes from its last checkpoint.", file=sys.stderr)
        return 1
    print(f"[{args.stage}] best mean IU {metrics['mean_iu']:.4f} at iteration {metrics['best_iteration']} "
          f"of {metrics['iterations']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
