"""How a stage's schedule follows its global batch (train.scaling).

    derive(rule, workers=, images_per_worker=, loss=, lr=, iterations=, val_every=) -> Scaling
    for_stage(params, stage) -> Scaling                          the same, read from the params
    warmup_factor(iteration, warmup_iterations, start) -> float  the lr multiplier of one step

A stage's lr, iterations and val_every in the params are for the reference's schedule:
one image a step (batch 1). A step here takes B = workers x images_per_worker images
(the global batch). "none" uses the params as they are, so each stage sees B times the
reference's images. "linear" keeps the images seen and the per-image step (Goyal et al.
2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour"):

    iterations  ceil(iterations / B)       the same number of images per stage
    val_every   max(1, val_every / B to the nearest, halves up)   as often, counted in images
    lr          lr x workers x (images_per_worker with loss mean, 1 with loss sum)
    warm-up     ceil(WARMUP_IMAGES / B) steps from lr up to the derived lr, when the lr grows

Why that lr. B steps of batch 1 move the weights by about lr x (sum of the B per-image
gradients); one step must do the same. DDP averages the workers' gradients. Inside a
worker, loss "sum" adds every pixel of its images (pipelines.train.loop.segmentation_loss),
so a worker's gradient is the sum of its images' and the average over workers is
images_per_worker x the per-image mean: the lr grows by the number of workers. Loss "mean"
divides by the worker's valid pixels, so the average over workers is the per-image mean
(each image weighted by its valid pixels; crops of one size differ only in void and
padding): the lr grows by B, the linear rule. With whole images (one per worker) both
are workers x lr.

The warm-up is a fixed amount of data, as Goyal et al.'s 5 epochs are, never a share of the
iteration count: more iterations continue a run (recipe.CONTINUES_RUN) and must not change
how it started. It starts at the params' lr, as theirs starts at the small-batch rate.

Only SGD: Adam divides each gradient by its own running scale, so the linear rule is no
rule for it (params refuses train.scaling linear with train.optimizer adam).
"""
from __future__ import annotations

import dataclasses

from pipelines.core.params import Params

# Images the warm-up lasts: 1/20 of the reference's 100,000-image stage, about the share of
# Goyal et al.'s 5 of 90 epochs. Their 5 epochs of SBD's 8,498 images would be 42% of a stage.
WARMUP_IMAGES = 5_000


@dataclasses.dataclass(frozen=True)
class Scaling:
    """A stage's schedule derived from its params for its global batch (see the module's text).

    base_*: the params' values (one image a step); lr, iterations, val_every: what the stage
    runs with; warmup_iterations: steps whose lr ramps from base_lr up to lr (0: none);
    note: one line saying what was derived from what.
    """
    rule: str
    workers: int
    images_per_worker: int
    global_batch: int
    loss: str
    base_lr: float
    base_iterations: int
    base_val_every: int
    lr_factor: int
    lr: float
    iterations: int
    val_every: int
    warmup_iterations: int
    note: str

    @property
    def warmup_start(self) -> float:
        """The lr multiplier of the first warm-up step: the params' lr."""
        return 1.0 / self.lr_factor

    def asked_iterations(self, steps: int) -> int:
        """An iteration count for the params that makes at least `steps` steps."""
        return steps * self.global_batch if self.rule == "linear" else steps


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def derive(rule: str, *, workers: int, images_per_worker: int, loss: str, lr: float, iterations: int,
           val_every: int) -> Scaling:
    """The stage's lr, iterations, val_every and warm-up under `rule` ("none" or "linear")."""
    if rule not in ("none", "linear"):
        raise ValueError(f"train.scaling {rule!r}: expected 'none' or 'linear'")
    if loss not in ("sum", "mean"):
        raise ValueError(f"train.loss {loss!r}: expected 'sum' or 'mean'")
    batch = workers * images_per_worker
    head = f"scaling {rule}: {_count(workers, 'worker')} x {_count(images_per_worker, 'image')} = global batch {batch}"
    if rule == "none":
        note = (f"{head}; lr {lr:g}, iterations {iterations}, val_every {val_every} as the params give them"
                + (f" (a stage sees {batch}x the reference's images; train.scaling linear keeps them)"
                   if batch > 1 else ""))
        return Scaling(rule, workers, images_per_worker, batch, loss, lr, iterations, val_every,
                       1, lr, iterations, val_every, 0, note)
    factor = workers * (images_per_worker if loss == "mean" else 1)
    steps = -(-iterations // batch)
    every = max(1, (2 * val_every + batch) // (2 * batch))  # nearest, halves up
    warmup = -(-WARMUP_IMAGES // batch) if factor > 1 else 0
    why = (f" (loss sum adds a worker's {images_per_worker} images already: lr x {_count(workers, 'worker')})"
           if loss == "sum" and images_per_worker > 1 else "")
    ramp = (f"warm-up {warmup} steps from lr {lr:g}" + (" (the whole stage)" if warmup >= steps else "")
            if warmup else "no warm-up (lr unchanged)")
    note = (f"{head}; lr {lr:g} -> {lr * factor:g}{why}, iterations {iterations} -> {steps}, "
            f"val_every {val_every} -> {every}, {ramp}")
    return Scaling(rule, workers, images_per_worker, batch, loss, lr, iterations, val_every,
                   factor, lr * factor, steps, every, warmup, note)


def for_stage(params: Params, stage: str) -> Scaling:
    """derive() from the params of `stage` (train.batch_size images a worker: whole images come one a batch)."""
    train = params.train
    entry = train.stages[stage]
    return derive(train.scaling, workers=params.ray.num_workers, images_per_worker=train.batch_size,
                  loss=train.loss, lr=entry.lr, iterations=entry.iterations, val_every=train.val_every)


def warmup_factor(iteration: int, warmup_iterations: int, start: float) -> float:
    """The lr multiplier of step `iteration` (from 1): `start` at step 1, rising by the same
    amount each step, 1 from step warmup_iterations + 1 on."""
    if iteration > warmup_iterations:
        return 1.0
    return start + (1.0 - start) * (iteration - 1) / warmup_iterations
