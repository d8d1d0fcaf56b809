"""What a training worker runs: set-up, one train_step, validation, checkpoint files.

    worker = StageWorker(config, device)            the stage's starting network, optimizer, grad scaler
                                                    (amp_dtype=torch.bfloat16: another autocast, for benchmarks)
    worker.resume(directory)                        from a checkpoint written by save()
    worker.warm_up(iteration)                       the learning rates of that step (warm-up, lr step)
    worker.train_step(images, labels) -> loss       forward (autocast_dtype: float16 on a GPU with train.amp,
                                                    bfloat16 on CPU cores with train.cpu_amp), loss, backward, step
                                                    (no step when the loss is NaN or infinite on any worker)
    worker.validate(batches) -> ConfusionMatrix     summed over every worker of the process group
    worker.save(directory, iteration, ...)          model.pt + meta.json + what resuming needs
    run(worker, batches, val_batches, report, ...)  the stage's schedule: steps, logging, validations

None of this needs Ray: the Ray Train worker function (pipelines.train.trainer.train_loop)
hands in its device, the model wrapper (DDP), the data and the report call; a
benchmark or a GPU check builds a StageWorker and calls train_step directly. `config`
is a frozen StageConfig made on the driver by `stage_config`; what only a run has (its
MLflow run id, a trace directory) comes as arguments. Its lr, iterations and val_every are
what train.scaling derives from the params (pipelines.train.scaling), which it carries too.

Validation: every worker scores its share of val into a confusion matrix; the
matrices are summed over the process group (all_reduce), so the scores are those of
one pass over all of val, whatever the number of workers.

A non-finite loss: every worker learns whether any worker's loss was NaN or
infinite (one all_reduce of a flag), so all of them skip that step's update
together. Up to train.max_nonfinite_steps such steps are skipped over a run; the
next one raises NonFiniteLoss on every worker at once, naming the iteration and the
last checkpoint written before it, so a broken network is never validated or saved.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fcn_models import subnormals
from fcn_models.checkpoint import load_checkpoint, save_checkpoint
from fcn_models.fcn import build_fcn, reference_param_groups
from fcn_models.metrics import SCORE_KEYS, ConfusionMatrix
from fcn_models.surgery import load_imagenet_weights, transfer_weights
from fcn_models.voc import VOID
from fcn_models.weights import read_plain
from pipelines.core.console import say
from pipelines.core.errors import StageError
from pipelines.core.params import Params, input_norm
from pipelines.train import scaling as scaling_rule
from pipelines.train.recipe import StageInit, stage_variant
from pipelines.train.timing import PhaseClock

# The layer that learns in a "fixed" stage (the paper's FCN-32s-fixed row).
FIXED_STAGE_LEARNS = "score_fr"
HISTORY_COLUMNS = ("iteration", "loss", *SCORE_KEYS)
TRAIN_STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


# --------------------------------------------------------------------------- optimisation

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
                   kind: str = "sgd", beta2: float = scaling_rule.ADAM_BETA2) -> torch.optim.Optimizer:
    """SGD as the reference: weights at lr with decay, biases at 2 x lr without.

    kind "adam" keeps the same groups with Adam (momentum as its beta1, and beta2), for
    nets that start from random weights or fine-tune a small one. Only parameters that
    require a gradient are in a group, so momentum and weight decay cannot move frozen ones.
    """
    groups = [g for g in reference_param_groups(model, lr, weight_decay) if g["params"]]
    if not groups:
        raise StageError("no parameter of the model requires a gradient: nothing to train")
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=(momentum, beta2))
    raise StageError(f"train.optimizer {kind!r}: expected 'sgd' or 'adam'")


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Pixel-wise cross entropy, void pixels skipped.

    "sum" adds over the valid pixels (the reference: batch 1, summed, hence its tiny
    learning rates); "mean" divides by the number of valid pixels, and is 0 (not NaN)
    for a batch with none.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"loss reduction {reduction!r}: expected 'sum' or 'mean'")
    total = F.cross_entropy(logits.float(), labels, ignore_index=VOID, reduction="sum")
    if reduction == "sum":
        return total
    valid = (labels != VOID).sum()
    return total / valid.clamp(min=1)


# --------------------------------------------------------------------------- validation

@torch.no_grad()
def confusion_matrix(model: nn.Module, batches, num_classes: int, device: torch.device,
                     autocast: Optional[torch.dtype] = None) -> ConfusionMatrix:
    """Score (images, labels) batches with the model in eval mode (under autocast to that
    dtype, if one is given)."""
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    device = torch.device(device)
    for images, labels in batches:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(images)
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


def all_agree(device: torch.device) -> Callable[[bool], bool]:
    """A function telling every worker whether all of them said True (one all-reduce a call)."""
    def agree(mine: bool) -> bool:
        return int(all_reduce_sum(torch.tensor([0 if mine else 1]), device)[0]) == 0
    return agree


def merge_confusion(matrix: ConfusionMatrix, device: torch.device) -> ConfusionMatrix:
    summed = all_reduce_sum(torch.from_numpy(matrix.matrix.copy()), device)
    return ConfusionMatrix(matrix.num_classes, matrix.ignore_index, summed.numpy())


# --------------------------------------------------------------------------- the stage's network

@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Everything a worker needs to train a stage (every path absolute); made on the driver by
    `stage_config`, handed to every Ray Train worker as it is (picklable). lr, iterations and
    val_every and momentum: as train.scaling derives them (`scaling`, with its warm-up and
    Adam's beta2)."""
    stage: str
    variant: str
    init: StageInit
    backbone: str
    width: float
    num_classes: int
    input_norm: str
    fixed: bool
    lr: float
    iterations: int
    seed: int
    loss: str
    optimizer: str
    momentum: float
    weight_decay: float
    amp: bool
    cpu_amp: bool
    val_every: int
    log_every: int
    max_nonfinite_steps: int
    scaling: scaling_rule.Scaling
    # The data pipeline reads the model, augment and train sections.
    params: Params


def stage_config(params: Params, stage: str, init: StageInit) -> StageConfig:
    """The stage's StageConfig from the params and where its weights start."""
    train, stage_params = params.train, params.train.stages[stage]
    derived = scaling_rule.for_stage(params, stage)
    return StageConfig(
        stage=stage, variant=stage_variant(stage), init=init,
        backbone=params.model.backbone, width=params.model.width, num_classes=params.model.num_classes,
        input_norm=input_norm(params).name,
        fixed=stage_params.fixed, lr=derived.lr, iterations=derived.iterations,
        seed=train.seed, loss=train.loss, optimizer=train.optimizer, momentum=derived.momentum,
        weight_decay=train.weight_decay,
        amp=train.amp, cpu_amp=train.cpu_amp, val_every=derived.val_every, log_every=train.log_every,
        max_nonfinite_steps=train.max_nonfinite_steps, scaling=derived,
        params=params,
    )


def initial_model(config: StageConfig) -> nn.Module:
    """The network a stage starts from, on the CPU, with its starting weights."""
    norm, init = config.input_norm, config.init
    model = build_fcn(config.variant, backbone=config.backbone, num_classes=config.num_classes,
                      width=config.width, input_norm=norm)
    try:
        if init.source == "imagenet":
            load_imagenet_weights(model, init.path, norm=norm)
        elif init.source != "random":
            previous, _ = load_checkpoint(init.path, variant=stage_variant(init.source))
            if previous.input_norm.name != norm:
                raise ValueError(f"its weights expect input normalisation {previous.input_norm.name!r}, "
                                 f"params say {norm!r} (model.input_norm, or the backbone's own)")
            transfer_weights(previous, model)
    except (ValueError, KeyError, FileNotFoundError) as err:
        fix = ("retrain " + init.source + " with the current model.* params" if init.source != "imagenet"
               else "give model.imagenet_weights a torchvision state dict for this backbone at width 1.0")
        raise StageError(f"cannot start {config.stage} from {init.note}: {err}; {fix}") from None
    return model


def checkpoint_meta(config: StageConfig, iteration: int, scores: dict, matrix: ConfusionMatrix,
                    run_id: Optional[str] = None) -> dict:
    """A checkpoint's meta.json; run_id: the stage's MLflow run, which evaluate and register find there."""
    meta = {
        "stage": config.stage,
        "init": config.init.note,
        "iterations": iteration,
        "val": {**{k: scores[k] for k in SCORE_KEYS},
                # NaN (a class in neither truth nor prediction) is no JSON: null.
                "per_class_iu": [None if math.isnan(v) else v for v in scores["per_class_iu"]]},
        "confusion_matrix": matrix.matrix.tolist(),
    }
    if run_id:
        meta["mlflow_run_id"] = run_id
    return meta


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX512-BF16 or AMX); without them
    bfloat16 autocast is emulated and slower than float32."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(config: StageConfig, device: torch.device, warn: bool = True) -> Optional[torch.dtype]:
    """What a stage's steps autocast to on `device` (None: float32): float16 on a GPU with
    train.amp, bfloat16 on CPU cores with train.cpu_amp where the CPU has bfloat16 kernels."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16 if config.amp else None
    if device.type == "cpu" and config.cpu_amp:
        if cpu_has_bf16():
            return torch.bfloat16
        if warn:
            say(f"[{config.stage}] train.cpu_amp: this CPU has no bfloat16 kernels (AVX512-BF16 or AMX), "
                "so the stage trains in float32; set train.cpu_amp false to silence this")
    return None


# Optimizer steps between two zeroings of the subnormal weights and optimizer state.
FLUSH_EVERY = 8


class NonFiniteLoss(StageError):
    """The loss was NaN or infinite once more than train.max_nonfinite_steps allows;
    raised on every worker at the same iteration."""

    def __init__(self, stage: str, iteration: int, loss: float, skipped: int, allowed: int,
                 last_checkpoint: Optional[int], where: Optional[str] = None):
        self.stage, self.iteration, self.loss = stage, iteration, loss
        self.skipped, self.allowed, self.last_checkpoint = skipped, allowed, last_checkpoint
        last = (f"the last good checkpoint is the one of iteration {last_checkpoint}"
                + (f" ({where})" if where else "") if last_checkpoint else "no checkpoint was written before it")
        super().__init__(
            f"stage {stage}: the training loss is {loss} at iteration {iteration} (non-finite step {skipped}; "
            f"train.max_nonfinite_steps allows {allowed}); training stopped there and {last}. Lower the "
            f"learning rate (train.stages.{stage}.lr), check the input data, or allow a few skipped steps "
            "with train.max_nonfinite_steps")

    def as_dict(self) -> dict:
        return {"stage": self.stage, "iteration": self.iteration, "loss": self.loss, "skipped": self.skipped,
                "allowed": self.allowed, "last_checkpoint": self.last_checkpoint}

    @classmethod
    def from_dict(cls, d: dict, where: Optional[str] = None) -> "NonFiniteLoss":
        """The error again from as_dict(), `where` naming the last checkpoint's location."""
        return cls(d["stage"], d["iteration"], d["loss"], d["skipped"], d["allowed"], d["last_checkpoint"], where)


class StageWorker:
    """One worker's network, optimizer and grad scaler for a stage, and what it does with them.

    wrap: applied to the network once its starting weights are in (Ray Train's
    prepare_model: DDP; default: moved to `device`); training steps go through the wrapped model, validation and
    checkpoints use the network itself.
    amp_dtype: None, the stage's rule (autocast_dtype); a dtype forces autocast to it on any
    device (the scaler only for float16), which is how a benchmark measures bfloat16.
    run_id: the stage's MLflow run, named in the checkpoints it saves (None: no run).
    """

    def __init__(self, config: StageConfig, device: torch.device, rank: int = 0,
                 wrap: Optional[Callable[[nn.Module], nn.Module]] = None,
                 checkpoint_dir: Optional[Path] = None, amp_dtype: Optional[torch.dtype] = None,
                 run_id: Optional[str] = None):
        self.config, self.device, self.rank, self.run_id = config, torch.device(device), rank, run_id
        if amp_dtype is None:
            amp_dtype = autocast_dtype(config, self.device, warn=rank == 0)
        self.use_amp = amp_dtype not in (None, torch.float32)
        self.amp_dtype = amp_dtype if self.use_amp else torch.float32
        # Same seed on every rank: identical starting weights (DDP also broadcasts rank 0's).
        torch.manual_seed(config.seed)
        # Channels-last weights and inputs: oneDNN (CPU) and cuDNN (tensor cores) pick
        # faster convolutions; the numbers and the saved state dict's values are the same.
        self.net = initial_model(config).to(memory_format=torch.channels_last)
        freeze_for_stage(self.net, config.fixed)
        self.start, self.history, state = 0, [], None
        # Steps skipped for a non-finite loss over the run, and whether the last one was.
        self.nonfinite_steps, self.last_step_finite = 0, True
        if checkpoint_dir is not None:
            state = self._load(Path(checkpoint_dir))
            self.start, self.history = state["iteration"], state["history"]
            self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        # The iteration of the last step, counted on from where this attempt starts.
        self.steps_taken = self.start
        # Dropout streams differ per rank and depend only on where this attempt starts.
        torch.manual_seed(config.seed + 1_000_003 * rank + self.start)
        self.model = wrap(self.net) if wrap is not None else self.net.to(self.device)
        self.optimizer = make_optimizer(self.net, config.lr, config.momentum, config.weight_decay,
                                        config.optimizer, config.scaling.beta2)
        # Each group's rate after any warm-up (biases at twice the weights'); a checkpoint's
        # optimizer state brings the rates of the step it was saved at, warm_up sets them again.
        self.full_lrs = [group["lr"] for group in self.optimizer.param_groups]
        # bfloat16 has float32's range: no loss scaling.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)
        if state is not None:
            # After wrapping: load_state_dict moves the momentum buffers to the parameters' device.
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])

    def _load(self, directory: Path) -> dict:
        saved, _ = load_checkpoint(directory, variant=self.config.variant)
        self.net.load_state_dict(saved.state_dict())
        state = read_plain(directory / TRAIN_STATE_FILE)
        state["history"] = json.loads((directory / HISTORY_FILE).read_text())
        return state

    def warm_up(self, iteration: int) -> None:
        """Set every group's learning rate for step `iteration` (from 1): train.scaling's linear
        warm-up and the stage's lr step scale all groups alike, so biases keep twice the
        weights' rate; the step after the warm-up sets the full rates, every step from the lr
        step on the lower ones, and the steps between leave the rates alone."""
        derived = self.config.scaling
        if derived.lr_step_iteration and iteration >= derived.lr_step_iteration:
            factor = scaling_rule.LR_STEP_FACTOR
        # Outside the ramp (and its first step after) the rates are left as they are: the
        # optimizer's own, or what a caller set on purpose.
        elif iteration > derived.warmup_iterations + 1 or derived.warmup_iterations == 0:
            return
        else:
            factor = scaling_rule.warmup_factor(iteration, derived.warmup_iterations, derived.warmup_start)
        for group, lr in zip(self.optimizer.param_groups, self.full_lrs):
            group["lr"] = lr * factor

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a batch; returns the loss (detached, on the device).

        When the loss is not finite on this worker or any other, no worker updates its
        weights (last_step_finite is then False): backward still runs everywhere, since
        DDP's gradient all_reduce needs every rank, and the next zero_grad drops the result.
        """
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            logits = self.model(images)
        loss = segmentation_loss(logits, labels, self.config.loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # One host sync a step (the grad scaler makes one anyway on a GPU).
        bad = all_reduce_sum((~torch.isfinite(loss.detach())).to(torch.float32).reshape(1), self.device)
        self.last_step_finite = not bool(bad.item())
        self.steps_taken += 1
        if self.last_step_finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # Weight decay drives unused weights and their moments into subnormals, which
            # slow every later step (and the saved network) many times over on a CPU. They
            # creep in over many steps, so zeroing them every few steps is enough; the count
            # goes on from the iteration a run resumed at, so a resumed run flushes where an
            # unbroken one does.
            if self.steps_taken % FLUSH_EVERY == 0:
                self.flush_subnormals()
        return loss.detach()

    def flush_subnormals(self) -> None:
        subnormals.flush_module_(self.net)
        subnormals.flush_optimizer_(self.optimizer)

    def validate(self, batches: Iterable) -> ConfusionMatrix:
        """The confusion matrix of `batches`, summed over every worker of the process group.
        The network itself, not DDP: workers score different numbers of images."""
        matrix = confusion_matrix(self.net, batches, self.config.num_classes, self.device,
                                  self.amp_dtype if self.use_amp else None)
        return merge_confusion(matrix, self.device)

    def save(self, directory: Path, iteration: int, scores: dict, matrix: ConfusionMatrix) -> None:
        """model.pt + meta.json (the stage's output format), plus the optimizer and scaler
        state and the validation history, which resuming needs."""
        directory = Path(directory)
        self.flush_subnormals()
        save_checkpoint(directory, self.net, checkpoint_meta(self.config, iteration, scores, matrix, self.run_id))
        torch.save({"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                    "iteration": iteration, "nonfinite_steps": self.nonfinite_steps}, directory / TRAIN_STATE_FILE)
        (directory / HISTORY_FILE).write_text(json.dumps(self.history))


def read_history(directory: Path) -> list[dict]:
    """The validation history saved with a checkpoint (every row up to it)."""
    return json.loads((Path(directory) / HISTORY_FILE).read_text())


# --------------------------------------------------------------------------- the schedule

class Trace:
    """A record of a run's attempts and steps, in <directory> (`fcn train --trace-dir`); off (None) by default.

    workers.jsonl: one line per worker and attempt (rank, pid, start iteration), so a
    test can find the worker processes; iterations.log (rank 0): "start A I" when
    attempt A begins after iteration I, "A I" after each iteration, "checkpoint A I"
    once a checkpoint is reported. A resumed run shows exactly which steps were redone.
    """

    @staticmethod
    def read(path: Path) -> dict:
        """An iterations.log read back: {"starts": [(attempt, iteration)], "checkpoints":
        [(attempt, iteration)], "steps": {attempt: [iteration]}}."""
        starts, checkpoints, steps = [], [], {}
        for line in Path(path).read_text().splitlines():
            words = line.split()
            if words[0] == "start":
                starts.append((int(words[1]), int(words[2])))
            elif words[0] == "checkpoint":
                checkpoints.append((int(words[1]), int(words[2])))
            else:
                steps.setdefault(int(words[0]), []).append(int(words[1]))
        return {"starts": starts, "checkpoints": checkpoints, "steps": steps}

    def __init__(self, directory: Optional[str], rank: int):
        self.directory = Path(directory) if directory else None
        self.rank, self.attempt = rank, 0
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, line: str) -> None:
        if self.directory and (self.rank == 0 or name == "workers.jsonl"):
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

    def step(self, iteration: int) -> None:
        self._append("iterations.log", f"{self.attempt} {iteration}")

    def checkpoint(self, iteration: int) -> None:
        self._append("iterations.log", f"checkpoint {self.attempt} {iteration}")


class NoMetrics:
    """What `run` logs to when the stage has no tracking run."""

    def resume(self, history):
        pass

    def validation(self, row):
        pass

    def train_loss(self, iteration, value):
        pass


def run(worker: StageWorker, batches: Iterator, val_batches: Callable[[], Iterable],
        report: Callable[[dict, Optional[Callable[[Path], None]]], None], metrics=None,
        trace_dir: Optional[str] = None) -> None:
    """Train from worker.start to config.iterations: a step per batch at the rates of its
    iteration (worker.warm_up), a progress line every log_every iterations (rank 0), a
    validation every val_every iterations and at the end.

    After each validation `report(row, write)` hands the row to the caller with a function
    that writes the checkpoint into a directory (Ray Train: every rank reports, rank 0
    attaches the checkpoint). `metrics` (pipelines.track.metrics_log.MetricsLog on Ray Train)
    gets the rows and the training loss; trace_dir: where Trace records (None: off). A
    non-finite loss beyond config.max_nonfinite_steps raises
    NonFiniteLoss (on every worker at the same iteration).
    """
    config, rank, device = worker.config, worker.rank, worker.device
    metrics = metrics or NoMetrics()
    trace = Trace(trace_dir, rank)
    start, iterations, val_every = worker.start, config.iterations, config.val_every
    trace.start(start)
    metrics.resume(worker.history)
    if start >= iterations and rank == 0:
        say(f"[{config.stage}] run already at iteration {start} (asked for {iterations}): nothing to train")
    # Kept on the device: a .item() every step would stall a GPU.
    loss_sum, loss_count = torch.zeros((), dtype=torch.float64, device=device), 0
    tick, tick_iteration = time.perf_counter(), start
    last_checkpoint = start or None
    clock = PhaseClock(worker.history)
    worker.model.train()
    for iteration in range(start + 1, iterations + 1):
        try:
            images, labels = next(batches)
        except StopIteration:
            raise StageError(f"the train data of worker {rank} ran out at iteration {iteration} of {iterations}: "
                             "its shard is empty or too small (use more images or fewer workers)") from None
        if iteration == start + 1:
            clock.lap("data_start_s")
        worker.warm_up(iteration)
        loss = worker.train_step(images, labels)
        trace.step(iteration)
        if not worker.last_step_finite:
            worker.nonfinite_steps += 1
            allowed = config.max_nonfinite_steps
            if worker.nonfinite_steps > allowed:
                raise NonFiniteLoss(config.stage, iteration, loss.item(), worker.nonfinite_steps, allowed,
                                    last_checkpoint)
            if rank == 0:
                say(f"[{config.stage}] iteration {iteration}: loss {loss.item()} (not finite on some worker), "
                    f"step skipped ({worker.nonfinite_steps} of the {allowed} train.max_nonfinite_steps allows)")
        else:
            loss_sum, loss_count = loss_sum + loss, loss_count + 1

        if rank == 0 and worker.last_step_finite and (iteration % config.log_every == 0 or iteration == iterations):
            now = time.perf_counter()
            rate = (iteration - tick_iteration) / max(now - tick, 1e-9)
            tick, tick_iteration = now, iteration
            loss_value = loss.item()
            say(f"[{config.stage}] iteration {iteration}/{iterations}  loss {loss_value:.4g}  {rate:.2f} it/s")
            metrics.train_loss(iteration, loss_value)

        if iteration % val_every == 0 or iteration == iterations:
            clock.lap("train_s")
            matrix = worker.validate(val_batches())
            if matrix.total == 0:
                raise StageError("validation scored no pixel: the val shards are empty or all void")
            totals = all_reduce_sum(torch.stack([loss_sum.cpu(), torch.tensor(float(loss_count), dtype=torch.float64)]),
                                    device)
            scores = matrix.scores()
            clock.lap("val_s")
            row = {"iteration": iteration, "loss": float(totals[0] / totals[1]), **{k: scores[k] for k in SCORE_KEYS},
                   **clock.row()}
            worker.history.append(row)
            loss_sum, loss_count = torch.zeros_like(loss_sum), 0
            if rank == 0:
                say(f"[{config.stage}] val at {iteration}: " + "  ".join(f"{k} {row[k]:.4f}" for k in SCORE_KEYS))
            report(row, lambda directory, it=iteration, s=scores, m=matrix: worker.save(directory, it, s, m))
            last_checkpoint = iteration
            trace.checkpoint(iteration)
            # After the report: a validation redone after a failure is then one whose
            # checkpoint never registered, and logging skips steps already logged.
            metrics.validation(row)
            worker.model.train()
