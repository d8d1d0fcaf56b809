"""The ImageNet stand-in: a width-scaled VGG16 classifier trained on generated pictures (`fcn standin`).

The paper's FCNs start from an ImageNet classifier whose fully connected layers become
convolutions (fc6 7x7 on pool5, fc7 1x1) and are fine-tuned. Where no ImageNet VGG16
fits (offline, or a trunk of another width) this makes a classifier to stand in for it:
torchvision's VGG16 at a channel width, taught to tell the 20 VOC object classes apart
on object-centred crops of generated scenes (pipelines.data.synthetic.object_crop, ids
of their own: never a picture of a generated mirror). The file is torchvision's vgg16
state dict (features.N, classifier.0/3/6), so model.imagenet_weights takes it as it
takes the real one (fcn_models.surgery.load_imagenet_weights).

How it is made:
- 224 x 224 inputs, so that pool5 is 7 x 7, fc6's kernel in the FCN; pixels normalised as
  for torchvision's ImageNet weights, the normalisation the FCN gives such weights.
- Batch norm after every convolution and fully connected layer while training (a VGG16
  without it learns far slower from scratch), then folded into the weights and biases:
  the file has torchvision's layout, which has no batch norm.
- Trained on the CPU in bfloat16 autocast with channels-last tensors, which makes oneDNN's
  fastest convolutions; weights, their updates and every evaluation of the written
  network stay float32.
- Each layer then rescaled so that its ReLU output has RMS 1 on calibration pictures, the
  last layer taking the inverse factor: the scores do not change (ReLU and max pooling
  commute with positive factors), while the features a fine-tuned FCN reads get a
  classifier's scale rather than whatever scale folding leaves.
- Saved in half precision when that keeps held-out top-1 within HALF_TOLERANCE of float32's.

A run is reproducible from its seed and step count (on one machine and thread count). The
learning rate warms up, holds, and decays over the last 1/DECAY_SHARE of the steps; only
that decay depends on the step count. --minutes decides the count when the time left, at
the recent speed, holds just the decay: the meta file's step count with `--steps` then
makes the same file again, and a machine that slows or speeds up early on changes only
how many steps there are.

    train_standin(out, width=, seed=, steps= | minutes=)   the file, its meta and log; returns the meta
    build_classifier(width, batch_norm)                    torchvision's VGG module at a width
    fold_batch_norm(trained, width), rescale_activations(model, x), top1(model, images, classes)
"""
from __future__ import annotations

import collections
import csv
import io
import math
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import VGG, cfgs, make_layers

from fcn_models import subnormals
from fcn_models.backbones import scaled
from fcn_models.limits import MAX_WIDTH
from fcn_models.norms import BACKBONE_NORMS
from fcn_models.outputs import OutputPathError, check_writable_under, make_dirs
from fcn_models.preprocess import normalize
from fcn_models.voc import class_names
from pipelines.core.console import say
from pipelines.core.errors import StageError, UsageError
from pipelines.core.files import atomic_write_bytes, atomic_write_text, file_sha256, write_json
from pipelines.core.params import PROJECT_ROOT
from pipelines.data.synthetic import CROP_INDICES, CROP_YEARS, object_crop, object_crops
from pipelines.track.provenance import git_state

INPUT_SIZE = 224
NORM = BACKBONE_NORMS["vgg16"]
# Output i is VOC class i + 1: the 20 object classes, no background.
CLASSES = tuple(class_names()[1:])
BATCH_SIZE = 32
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 0.01
DROPOUT = 0.3
# Linear warm-up, constant, then a linear decay over the last 1/DECAY_SHARE of the steps.
WARMUP_STEPS = 50
DECAY_SHARE = 5
# Steps whose durations give the recent speed, for --minutes.
SPEED_WINDOW = 20
EVAL_EVERY = 50
LOG_EVERY = 10
HELDOUT_IMAGES = 500
CALIBRATION_IMAGES = 64
HALF_TOLERANCE = 0.005
PREFETCH_BATCHES = 4
TRAIN_DTYPE = torch.bfloat16
# Held-out pictures per job of the background process.
HELDOUT_CHUNK = 100
# Evaluations after the last step (folded, half precision), budgeted by --minutes.
FINAL_EVALS = 2
MAX_STEPS = CROP_INDICES // BATCH_SIZE
LOG_FIELDS = ("step", "seconds", "lr", "loss", "train_top1", "heldout_top1")


# --------------------------------------------------------------------------- the network

def vgg16_config(width: float) -> list:
    """torchvision's VGG16 feature layers ("D": channel counts, "M" for max pooling) at a width,
    with fcn_models.backbones' rounding, so the FCN's trunk of that width has the same shapes."""
    return [c if c == "M" else scaled(c, width) for c in cfgs["D"]]


def build_classifier(width: float, batch_norm: bool) -> VGG:
    """torchvision's VGG module with VGG16's layers at a channel width and 20 outputs.

    Without batch norm its state dict has torchvision vgg16's keys; with it, a batch norm
    follows every convolution (as vgg16_bn) and both hidden fully connected layers.
    """
    config = vgg16_config(width)
    # VGG's constructor builds the width-1 head; on the meta device that costs nothing.
    with torch.device("meta"):
        model = VGG(nn.Sequential(), num_classes=len(CLASSES), init_weights=False)
    model.features = make_layers(config, batch_norm=batch_norm)
    pool5 = [c for c in config if c != "M"][-1]
    fc = scaled(4096, width)

    def hidden(n_in: int) -> list:
        return [nn.Linear(n_in, fc), *([nn.BatchNorm1d(fc)] if batch_norm else []), nn.ReLU(inplace=True),
                nn.Dropout(DROPOUT)]

    model.classifier = nn.Sequential(*hidden(pool5 * 7 * 7), *hidden(fc), nn.Linear(fc, len(CLASSES)))
    for layer in model.modules():  # torchvision's own initialisation of a VGG
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0, 0.01)
            nn.init.zeros_(layer.bias)
    return model


def _weighted_layers(model: VGG) -> list[tuple[nn.Module, Optional[nn.Module]]]:
    """(convolution or linear layer, the batch norm right after it or None), input to output."""
    layers = [*model.features, *model.classifier]
    out = []
    for i, layer in enumerate(layers):
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            after = layers[i + 1] if i + 1 < len(layers) else None
            out.append((layer, after if isinstance(after, nn.modules.batchnorm._BatchNorm) else None))
    return out


@torch.no_grad()
def fold_batch_norm(trained: VGG, width: float) -> VGG:
    """The network without batch norm that computes what `trained` computes in eval mode."""
    plain = build_classifier(width, batch_norm=False)
    for (layer, norm), (target, _) in zip(_weighted_layers(trained), _weighted_layers(plain), strict=True):
        weight, bias = layer.weight.double(), layer.bias.double()
        if norm is not None:
            factor = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
            weight = weight * factor.view(-1, *[1] * (weight.ndim - 1))
            bias = (bias - norm.running_mean.double()) * factor + norm.bias.double()
        target.weight.copy_(weight)
        target.bias.copy_(bias)
    return plain.eval()


@torch.no_grad()
def rescale_activations(model: VGG, x: torch.Tensor) -> list[float]:
    """Scale each layer of a network without batch norm so that its ReLU output has RMS 1 on x;
    the last layer takes the inverse factor, so the scores do not change. Returns the RMS before."""
    model.eval()
    relus = [m for m in [*model.features, *model.classifier] if isinstance(m, nn.ReLU)]
    rms: list[float] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: rms.append(float(out.double().square().mean().sqrt())))
             for r in relus]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    layers = [layer for layer, _ in _weighted_layers(model)]
    previous = 1.0  # the factor this layer's input carries
    for layer, value in zip(layers[:-1], rms, strict=True):
        factor = 1.0 / value if value > 0 else previous  # a dead layer keeps its input's factor
        layer.weight.mul_(factor / previous)
        layer.bias.mul_(factor)
        previous = factor
    layers[-1].weight.div_(previous)
    return rms


@torch.no_grad()
def top1(model: nn.Module, images: np.ndarray, classes: np.ndarray, batch: int = 50,
         training_form: bool = False) -> float:
    """The share of images (uint8 N x H x W x 3) whose highest score is their class (0-based);
    training_form: computed as in training (_inputs, bfloat16 autocast)."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        if training_form:
            with torch.autocast("cpu", dtype=TRAIN_DTYPE):
                logits = model(_inputs(x))
        else:
            logits = model(normalize(x, NORM))
        correct += int((logits.argmax(1) == torch.from_numpy(classes[start:start + batch])).sum())
    return correct / len(images)


def _inputs(images: np.ndarray) -> torch.Tensor:
    """A training batch's network input: normalised, channels last."""
    return normalize(images, NORM).contiguous(memory_format=torch.channels_last)


def decay_start(total: int) -> int:
    """The first step of the learning rate's decay in a run of total steps."""
    return total - total // DECAY_SHARE


def total_decaying_from(step: int) -> int:
    """The step count whose decay starts at step (decay_start rises by 0 or 1 a step, so one exists)."""
    total = step
    while decay_start(total) < step:
        total += 1
    return total


def lr_at(step: int, total: Optional[int]) -> float:
    """The learning rate of step (0-based) in a run of total steps (None: not decided yet, so
    before its decay): linear warm-up over WARMUP_STEPS, constant, then a linear decay from
    decay_start(total) towards zero at step total."""
    rate = LEARNING_RATE * min(1.0, (step + 1) / WARMUP_STEPS)
    if total is None or step < decay_start(total):
        return rate
    return rate * (total - step) / (total - decay_start(total))


# --------------------------------------------------------------------------- the pictures

class CropFeed:
    """Training batches made ahead, in order, in a process of its own; and the held-out crops.

    Batch k holds the training crops k * BATCH_SIZE ... (k + 1) * BATCH_SIZE - 1, whatever the
    timing. The process is spawned, not forked: this one already runs torch's threads.
    """

    def __init__(self, seed: int, heldout: int):
        self.seed = seed
        self._pool = multiprocessing.get_context("spawn").Pool(1)
        self._heldout_jobs = [
            self._pool.apply_async(object_crops, (seed, "heldout", start, min(HELDOUT_CHUNK, heldout - start),
                                                  INPUT_SIZE))
            for start in range(0, heldout, HELDOUT_CHUNK)]
        self._heldout: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._queue: collections.deque = collections.deque()
        self._submitted = 0
        for _ in range(PREFETCH_BATCHES):
            self._submit()

    def _submit(self) -> None:
        if (self._submitted + 1) * BATCH_SIZE <= CROP_INDICES:
            self._queue.append(self._pool.apply_async(
                object_crops, (self.seed, "train", self._submitted * BATCH_SIZE, BATCH_SIZE, INPUT_SIZE)))
            self._submitted += 1

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next training batch: (uint8 images, 0-based classes)."""
        job = self._queue.popleft()
        self._submit()
        images, classes = job.get()
        return images, classes - 1

    def heldout(self) -> tuple[np.ndarray, np.ndarray]:
        """Every held-out crop: (uint8 images, 0-based classes)."""
        if self._heldout is None:
            parts = [job.get() for job in self._heldout_jobs]
            self._heldout = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]) - 1
        return self._heldout

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def __enter__(self) -> "CropFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- outputs

def output_paths(out) -> tuple[Path, Path]:
    """(meta JSON, training log CSV) beside the weights file <name>.pth: <name>.json, <name>.csv."""
    out = Path(out)
    if out.suffix != ".pth":
        raise UsageError(f"--out {out}: name the weights file <name>.pth (its meta goes to <name>.json, "
                         "its training log to <name>.csv)")
    return out.with_suffix(".json"), out.with_suffix(".csv")


def _check_writable(out: Path) -> None:
    """Before any training: out is no directory and its directory can be made and written in."""
    what = f"--out {out}"
    if out.is_dir():
        raise UsageError(f"{what} is a directory: give the weights file's path, e.g. {out / 'vgg16-w0.125.pth'}")
    check_writable_under(out.parent, what)
    try:
        make_dirs(out.parent, what)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        os.close(fd)
        os.unlink(probe)
    except OutputPathError:
        raise
    except OSError as err:
        raise StageError(f"{what}: cannot write in {out.parent} ({err.strerror or err}): "
                         "choose a directory you can write to") from None


class TrainingLog:
    """The training log: a CSV of LOG_FIELDS, rewritten whole (atomically) at every row."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []

    def add(self, **row) -> None:
        self.rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, LOG_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


def _check_arguments(width: float, seed: int, steps: Optional[int], minutes: Optional[float], heldout: int) -> None:
    if not (isinstance(width, (int, float)) and 0 < width <= MAX_WIDTH):
        raise UsageError(f"--width {width!r}: must be in (0, {MAX_WIDTH:g}], the channel scale of VGG16 "
                         "(0.125 for the demo's trunk); use the FCN's model.width")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed {seed!r}: must be a non-negative integer")
    if (steps is None) == (minutes is None):
        raise UsageError("give exactly one of --steps and --minutes")
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"--steps {steps}: must be between 1 and {MAX_STEPS} "
                         f"({CROP_INDICES} training pictures, {BATCH_SIZE} a step)")
    if minutes is not None and not (isinstance(minutes, (int, float)) and 0 < minutes < math.inf):
        raise UsageError(f"--minutes {minutes!r}: must be a positive number")
    if not 1 <= heldout <= CROP_INDICES:
        raise UsageError(f"--heldout {heldout}: must be between 1 and {CROP_INDICES}")


# --------------------------------------------------------------------------- training

def train_standin(out, *, width: float, seed: int = 0, steps: Optional[int] = None,
                  minutes: Optional[float] = None, heldout: int = HELDOUT_IMAGES, command: str = "") -> dict:
    """Train the stand-in and write out (<name>.pth), <name>.json (meta) and <name>.csv (log).

    steps: that many steps; minutes: as many as fit that wall time (decided when what is left
    holds the decay). heldout: held-out pictures for accuracy. Returns the meta.
    """
    _check_arguments(width, seed, steps, minutes, heldout)
    out = Path(out)
    meta_file, log_file = output_paths(out)
    _check_writable(out)
    torch.manual_seed(seed)
    net = build_classifier(width, batch_norm=True).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    log = TrainingLog(log_file)
    started = time.perf_counter()
    budget = None if minutes is None else 60.0 * minutes
    total = steps
    say(f"standin: width {width:g} VGG16, {len(CLASSES)} classes, {INPUT_SIZE}px crops, batch {BATCH_SIZE}, "
        + (f"{steps} steps" if steps else f"{minutes:g} minutes") + f", seed {seed}")

    with CropFeed(seed, heldout) as feed:
        step, window, last_top1 = 0, [], None
        durations = collections.deque(maxlen=SPEED_WINDOW)  # for --minutes: the recent speed
        eval_seconds = None
        while total is None or step < total:
            lr = lr_at(step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tick = time.perf_counter()
            images, classes = feed.batch()
            labels = torch.from_numpy(classes)
            net.train()
            with torch.autocast("cpu", dtype=TRAIN_DTYPE):
                logits = net(_inputs(images))
            loss = F.cross_entropy(logits.float(), labels)
            if not torch.isfinite(loss):
                raise StageError(f"standin: the loss is {float(loss)} at step {step + 1}; nothing was written "
                                 f"but the log {log_file}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            subnormals.flush_module_(net)
            subnormals.flush_optimizer_(optimizer)
            step += 1
            window.append((float(loss.detach()), float((logits.argmax(1) == labels).float().mean())))
            durations.append(time.perf_counter() - tick)
            if total is None:  # --minutes: decide the step count once the time left holds just the decay
                candidate = total_decaying_from(step)
                per_step = sum(durations) / len(durations)
                per_eval = eval_seconds if eval_seconds is not None else per_step * heldout / BATCH_SIZE / 3
                evals = candidate // EVAL_EVERY - step // EVAL_EVERY + FINAL_EVALS
                if (time.perf_counter() - started + (candidate - step) * per_step + evals * per_eval >= budget
                        or total_decaying_from(step + 1) > MAX_STEPS):
                    total = candidate
                    say(f"standin: {per_step:.2f}s a step: {total} steps in all, the last "
                        f"{total - step} decaying the learning rate")

            if step % LOG_EVERY == 0 or step == total:
                heldout_top1 = None
                if step % EVAL_EVERY == 0 or step == total:
                    tick = time.perf_counter()
                    heldout_top1 = last_top1 = top1(net, *feed.heldout(), training_form=True)
                    eval_seconds = time.perf_counter() - tick
                elapsed = time.perf_counter() - started
                loss_mean = sum(w[0] for w in window) / len(window)
                acc_mean = sum(w[1] for w in window) / len(window)
                log.add(step=step, seconds=round(elapsed, 1), lr=f"{lr:.3g}", loss=round(loss_mean, 4),
                        train_top1=round(acc_mean, 4),
                        heldout_top1="" if heldout_top1 is None else round(heldout_top1, 4))
                say(f"step {step}/{total or '?'}  loss {loss_mean:.3f}  train top-1 {acc_mean:.3f}"
                    + ("" if heldout_top1 is None else f"  held-out top-1 {heldout_top1:.3f}")
                    + f"  lr {lr:.2e}  {elapsed:.0f}s")
                window = []

        heldout_images, heldout_classes = feed.heldout()
    seconds = time.perf_counter() - started

    top1_batch_norm = last_top1  # the last step's evaluation
    plain = fold_batch_norm(net, width)
    rms = rescale_activations(plain, normalize(heldout_images[:CALIBRATION_IMAGES], NORM))
    top1_float32 = top1(plain, heldout_images, heldout_classes)
    state = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    subnormals.flush_(state.values())
    half = {k: v.half() for k, v in state.items()}
    top1_half = None
    if all(torch.isfinite(v).all() for v in half.values()):
        plain.load_state_dict(half)
        top1_half = top1(plain, heldout_images, heldout_classes)
    use_half = top1_half is not None and top1_float32 - top1_half <= HALF_TOLERANCE
    buf = io.BytesIO()
    torch.save(half if use_half else state, buf)
    atomic_write_bytes(out, buf.getvalue())
    commit, dirty = git_state(PROJECT_ROOT)
    meta = {
        "what": "an ImageNet stand-in: torchvision's vgg16 state dict at a channel width, a 20-class classifier "
                "trained on generated object crops (pipelines/train/standin.py)",
        "file": out.name,
        "sha256": file_sha256(out),
        "dtype": "float16" if use_half else "float32",
        "command": command,
        "seed": seed,
        "width": float(width),
        "steps": step,
        "batch_size": BATCH_SIZE,
        "seconds": round(seconds, 1),
        "git_commit": None if commit == "unknown" else commit,
        "git_dirty": dirty,
        "heldout_top1": top1_half if use_half else top1_float32,
        "heldout_top1_float32": top1_float32,
        "heldout_top1_float16": top1_half,
        "heldout_top1_batch_norm": top1_batch_norm,
        "heldout_images": heldout,
        "image_size": INPUT_SIZE,
        "input_norm": NORM.name,
        "classes": list(CLASSES),
        "data": {"pictures": f"{object_crop.__module__}.{object_crop.__name__}",
                 "train_ids": f"{CROP_YEARS['train']}_*", "heldout_ids": f"{CROP_YEARS['heldout']}_*"},
        "relu_rms_before_rescale": [round(r, 6) for r in rms],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "log": log_file.name,
    }
    write_json(meta_file, meta)
    say(f"standin: held-out top-1 {meta['heldout_top1']:.3f} ({meta['dtype']}; float32 {top1_float32:.3f}, "
        f"with batch norm {top1_batch_norm:.3f}) after {step} steps, {seconds:.0f}s")
    return meta
