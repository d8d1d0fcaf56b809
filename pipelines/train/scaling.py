"""How a stage's schedule follows its global batch (train.scaling).

    derive(rule, workers=, images_per_worker=, loss=, lr=, iterations=, val_every=,
           warmup_images=, momentum=, lr_step_at=) -> Scaling
    for_stage(params, stage) -> Scaling                          the same, read from the params
    warmup_factor(iteration, warmup_iterations, start) -> float  the lr multiplier of one step

A stage's lr, iterations and val_every in the params are for the reference's schedule:
one image a step (batch 1). A step here takes B = workers x images_per_worker images
(the global batch). "none" uses the params as they are, so each stage sees B times the
reference's images. "linear" (SGD) and "sqrt" (Adam) keep the images seen and what a
batch-1 run does per image:

    iterations  ceil(iterations / B)       the same number of images per stage
    val_every   max(1, val_every / B to the nearest, halves up)   as often, counted in images
    warm-up     ceil(warmup_images / B) steps from lr up to the derived lr, when the lr grows
                (train.warmup_images)
    lr step     from step ceil(lr_step_at / B) + 1 on, LR_STEP_FACTOR x the lr
                (train.stages.<stage>.lr_step_at; under "none" it counts steps, as iterations do)

linear (Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour"):

    lr          lr x workers x (images_per_worker with loss mean, 1 with loss sum)

Why that lr. B steps of batch 1 move the weights by about lr x (sum of the B per-image
gradients); one step must do the same. DDP averages the workers' gradients. Inside a
worker, loss "sum" adds every pixel of its images (pipelines.train.loop.segmentation_loss),
so a worker's gradient is the sum of its images' and the average over workers is
images_per_worker x the per-image mean: the lr grows by the number of workers. Loss "mean"
divides by the worker's valid pixels, so the average over workers is the per-image mean
(each image weighted by its valid pixels; crops of one size differ only in void and
padding): the lr grows by B, the linear rule. With whole images (one a worker) both
are workers x lr.

sqrt (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
Algorithms", their square-root rule for Adam):

    lr          lr x sqrt(B)
    beta1       1 - B x (1 - beta1)        (train.momentum; must stay above 0)
    beta2       1 - B x (1 - beta2)        (ADAM_BETA2)

Adam divides each gradient by its own running scale, so the loss's reduction does not
matter and the linear rule is no rule for it: summing B per-image gradients grows the
step's mean by B but its noise only by sqrt(B), and the moments' averages must span the
same number of images, hence the betas. Their epsilon (divided by sqrt(B)) is left as
torch's 1e-8, far below the gradients' scale here.

The warm-up is a fixed amount of data, as Goyal et al.'s 5 epochs are, never a share of the
iteration count: more iterations continue a run (recipe.CONTINUES_RUN) and must not change
how it started. It starts at the params' lr, as theirs starts at the small-batch rate. The
lr step is placed the same way, at a number of images and not a share of the stage: a run
continued past it goes on at the lower rate.
params refuses linear with Adam and sqrt with SGD.
"""
from __future__ import annotations

import dataclasses

from pipelines.core.params import Params

# Adam's second-moment decay at batch 1 (its first is train.momentum).
ADAM_BETA2 = 0.999
RULES = ("none", "linear", "sqrt")
# The lr multiplier from a stage's lr_step_at on (the classic step schedule's tenth).
LR_STEP_FACTOR = 0.1

@dataclasses.dataclass(frozen=True)
class Scaling:
    """A stage's schedule derived from its params for its global batch (see the module's text).

    base_*: the params' values (one image a step); lr, iterations, val_every: what the stage
    runs with; warmup_iterations: steps whose lr ramps from base_lr up to lr (0: none);
    momentum, beta2: SGD's momentum or Adam's beta1, and Adam's beta2, as derived (the sqrt
    rule moves them; the others keep them); note: one line saying what was derived from what;
    lr_step_iteration: the first step at LR_STEP_FACTOR x the lr (0: none).
    """
    rule: str
    workers: int
    images_per_worker: int
    global_batch: int
    loss: str
    base_lr: float
    base_iterations: int
    base_val_every: int
    lr_factor: float
    lr: float
    iterations: int
    val_every: int
    warmup_iterations: int
    momentum: float
    beta2: float
    note: str
    lr_step_iteration: int = 0

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
           val_every: int, warmup_images: int, momentum: float, lr_step_at: int | None = None) -> Scaling:
    """The stage's lr, iterations, val_every, warm-up (over warmup_images), lr step (after
    lr_step_at images; None: none) and momentum (and Adam's beta2) under `rule` ("none",
    "linear" or "sqrt"). ValueError when the sqrt rule would take a beta to 0 or below."""
    if rule not in RULES:
        raise ValueError(f"train.scaling {rule!r}: expected one of {', '.join(map(repr, RULES))}")
    if loss not in ("sum", "mean"):
        raise ValueError(f"train.loss {loss!r}: expected 'sum' or 'mean'")
    batch = workers * images_per_worker
    head = f"scaling {rule}: {_count(workers, 'worker')} x {_count(images_per_worker, 'image')} = global batch {batch}"
    if rule == "none":
        step_at = lr_step_at + 1 if lr_step_at else 0
        note = (f"{head}; lr {lr:g}, iterations {iterations}, val_every {val_every} as the params give them"
                + (f" (a stage sees {batch}x the reference's images; train.scaling linear or sqrt keeps them)"
                   if batch > 1 else "") + _step_note(step_at))
        return Scaling(rule, workers, images_per_worker, batch, loss, lr, iterations, val_every,
                       1, lr, iterations, val_every, 0, momentum, ADAM_BETA2, note, step_at)
    why, betas = "", ""
    beta1, beta2 = momentum, ADAM_BETA2
    if rule == "linear":
        factor = workers * (images_per_worker if loss == "mean" else 1)
        if loss == "sum" and images_per_worker > 1:
            why = f" (loss sum adds a worker's {images_per_worker} images already: lr x {_count(workers, 'worker')})"
    else:
        factor = batch ** 0.5
        beta1, beta2 = 1 - batch * (1 - momentum), 1 - batch * (1 - ADAM_BETA2)
        if round(beta1, 12) <= 0:  # as params checks it
            raise ValueError(f"train.scaling sqrt: a global batch of {batch} takes Adam's beta1 (train.momentum "
                             f"{momentum:g}) to 1 - {batch} x {1 - momentum:g} = {beta1:.4g}, not above 0: "
                             f"raise train.momentum above {1 - 1 / batch:.4g}, or use fewer images a step")
        if batch > 1:
            why = f" (x sqrt {batch})"
            betas = f", beta1 {momentum:g} -> {beta1:.6g}, beta2 {ADAM_BETA2:g} -> {beta2:.6g}"
    steps = -(-iterations // batch)
    every = max(1, (2 * val_every + batch) // (2 * batch))  # nearest, halves up
    warmup = -(-warmup_images // batch) if factor > 1 and warmup_images else 0
    ramp = (f"warm-up {warmup} steps from lr {lr:g}" + (" (the whole stage)" if warmup >= steps else "")
            if warmup else "no warm-up (lr unchanged)")
    step_at = -(-lr_step_at // batch) + 1 if lr_step_at else 0
    note = (f"{head}; lr {lr:g} -> {lr * factor:g}{why}, iterations {iterations} -> {steps}, "
            f"val_every {val_every} -> {every}{betas}, {ramp}" + _step_note(step_at))
    return Scaling(rule, workers, images_per_worker, batch, loss, lr, iterations, val_every,
                   factor, lr * factor, steps, every, warmup, beta1, beta2, note, step_at)


def _step_note(step_at: int) -> str:
    return f", lr x {LR_STEP_FACTOR:g} from step {step_at}" if step_at else ""


def for_stage(params: Params, stage: str) -> Scaling:
    """derive() from the params of `stage` (train.batch_size images a worker: whole images come one a batch)."""
    train = params.train
    entry = train.stages[stage]
    return derive(train.scaling, workers=params.ray.num_workers, images_per_worker=train.batch_size,
                  loss=train.loss, lr=entry.lr, iterations=entry.iterations, val_every=train.val_every,
                  warmup_images=train.warmup_images, momentum=train.momentum, lr_step_at=entry.lr_step_at)


def warmup_factor(iteration: int, warmup_iterations: int, start: float) -> float:
    """The lr multiplier of step `iteration` (from 1): `start` at step 1, rising by the same
    amount each step, 1 from step warmup_iterations + 1 on."""
    if iteration > warmup_iterations:
        return 1.0
    return start + (1.0 - start) * (iteration - 1) / warmup_iterations
