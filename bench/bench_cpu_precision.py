"""Training step and validation forward on CPU cores: float32 against bfloat16 autocast (train.cpu_amp).

    .venv/bin/python bench/bench_cpu_precision.py [--steps 30] [--repeats 3] [--no-write]

Every setting runs what a demo stage runs, pipelines.train.loop's StageWorker: its
train_step (forward, mean loss, backward, Adam step of the reference groups, subnormal
flush) on a batch of 4 crops of 160 pixels, and its validate (one whole 160-pixel image at a
time), for FCN-32s and FCN-8s at the demo's width (VGG16 width 1/8), all cores as torch
threads:

  float32, NCHW           the layout the loop used before channels-last
  float32, channels-last  the baseline: float32 at its best (oneDNN's faster convolutions)
  bfloat16, channels-last train.cpu_amp: autocast to bfloat16, weights and optimizer float32

Each setting is timed `--repeats` times over `--steps` steps after 3 warm-up steps, the
settings interleaved so that a change in load touches all of them; the best repeat counts.
Ratios are against the float32 channels-last baseline of the same network.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchdoc import publish  # noqa: E402
from fcn_models import subnormals  # noqa: E402
from fcn_models.summary import cpu_model  # noqa: E402
from pipelines.core.params import parse_params  # noqa: E402
from pipelines.train import loop, recipe  # noqa: E402

SETTINGS = ("float32, NCHW", "float32, channels-last", "bfloat16, channels-last")
BASELINE = "float32, channels-last"
WIDTH, CROP, BATCH = 0.125, 160, 4


def worker(stage: str, setting: str, root: Path) -> loop.StageWorker:
    params = parse_params({
        "model": {"width": WIDTH, "imagenet_weights": None},
        "train": {"loss": "mean", "optimizer": "adam", "momentum": 0.9,
                  "cpu_amp": setting.startswith("bfloat16"), "models_dir": str(root / "models"),
                  "reports_dir": str(root / "reports"),
                  "stages": {stage: {"init": "imagenet", "lr": 1e-4, "iterations": 10}}},
    }, "bench params", root=root)
    w = loop.StageWorker(loop.stage_config(params, stage, recipe.resolve_init(params, stage)), "cpu")
    if setting.endswith("NCHW"):
        w.net.to(memory_format=torch.contiguous_format)
    return w


def is_nchw(w: loop.StageWorker) -> bool:
    # A 3x3 kernel: a 1x1 one is contiguous in both layouts.
    conv = next(p for p in w.net.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    return not conv.is_contiguous(memory_format=torch.channels_last)


def nchw_step(w: loop.StageWorker, images, labels) -> None:
    """train_step as it was before channels-last (it now hands the network channels-last
    inputs, which would switch an NCHW network's convolutions to channels-last too)."""
    with torch.autocast("cpu", dtype=w.amp_dtype, enabled=w.use_amp):
        logits = w.model(images)
    loss = loop.segmentation_loss(logits, labels, w.config.loss)
    w.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    w.optimizer.step()
    subnormals.flush_module_(w.net)
    subnormals.flush_optimizer_(w.optimizer)


def time_steps(w: loop.StageWorker, images, labels, steps: int) -> float:
    step = (lambda: nchw_step(w, images, labels)) if is_nchw(w) else (lambda: w.train_step(images, labels))
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def time_validation(w: loop.StageWorker, image, label, images: int) -> float:
    start = time.perf_counter()
    if is_nchw(w):
        w.net.eval()
        for _ in range(images):
            w.net(image).argmax(1)
        w.net.train()
    else:
        w.validate([(image, label)] * images)
    return (time.perf_counter() - start) / images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    if not loop.cpu_has_bf16():
        print("this CPU has no bfloat16 kernels (AVX512-BF16 or AMX): train.cpu_amp would train in float32; "
              "nothing to compare")
        return 1
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, CROP, CROP, generator=g)
    labels = torch.randint(0, 21, (BATCH, CROP, CROP), generator=g)
    load_before = os.getloadavg()
    step_s: dict = {}
    val_s: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("fcn32s", "fcn8s"):
            workers = {s: worker(stage, s, Path(tmp)) for s in SETTINGS}
            for w in workers.values():
                time_steps(w, images, labels, 3)
                time_validation(w, images[:1], labels[:1], 3)
            for _ in range(args.repeats):
                for s, w in workers.items():
                    step_s.setdefault((stage, s), []).append(time_steps(w, images, labels, args.steps))
                    val_s.setdefault((stage, s), []).append(time_validation(w, images[:1], labels[:1], args.steps))
    load_after = os.getloadavg()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_model()}, {threads} cores, {threads} torch threads, "
        f"torch {torch.__version__}. Load average (1 / 5 min) {load_before[0]:.2f} / {load_before[1]:.2f} before, "
        f"{load_after[0]:.2f} / {load_after[1]:.2f} after.",
        f"VGG16 width {WIDTH}; training step: {BATCH} crops of {CROP} px, Adam; validation: one whole "
        f"{CROP}-px image a forward. Best of {args.repeats} repeats of {args.steps} steps (or images).",
        "",
        "| network | setting | step ms | images/s | step vs baseline | val forward ms | val vs baseline |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for stage in ("fcn32s", "fcn8s"):
        base_step, base_val = min(step_s[(stage, BASELINE)]), min(val_s[(stage, BASELINE)])
        for s in SETTINGS:
            st, va = min(step_s[(stage, s)]), min(val_s[(stage, s)])
            lines.append(f"| {stage} | {s}{' (baseline)' if s == BASELINE else ''} | {st * 1000:.1f} | "
                         f"{BATCH / st:.1f} | {base_step / st:.2f}x | {va * 1000:.1f} | {base_val / va:.2f}x |")
    publish("## Training on CPU cores: float32 and bfloat16 (bench/bench_cpu_precision.py)", "bench_cpu_precision",
            "\n".join(lines), not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
