"""FCN-32s/16s/8s on a GPU: forward and the training step, by precision, memory layout and compilation,
as images/s and as a fraction of a bfloat16 matrix product measured in the same run.

    python bench/bench_gpu.py                    # on a GPU: 500x500, every setting; updates docs/BENCHMARKS.md
    python bench/bench_gpu.py --settings bf16-cl-compile --variants fcn8s --no-write
    python bench/bench_gpu.py --size 64 --crop 48 --crop-batch 2 --width 0.0625 --steps 2 --no-write  # CPU, small

Needs torch, fcn_models and pipelines.train.loop (with pipelines.core.params and .recipe: numpy and
PyYAML), nothing of Ray or MLflow. The training step is the one a stage runs,
`pipelines.train.loop.StageWorker.train_step` (forward under autocast, the loss, backward, the
reference SGD step through the grad scaler), from the stage's own starting network.

Modes, per network:
  forward      one whole image of --size x --size, inference mode (the paper's forward time)
  train whole  a training step on a batch of one whole --size image (the reference's batch)
  train crops  a training step on --crop-batch crops of --crop x --crop (train.batch_mode: crops)
Settings: fp32 (float32, NCHW, eager), fp16 (autocast float16 and the grad scaler), bf16
(autocast bfloat16), bf16-cl (bfloat16, channels-last weights and input), bf16-cl-compile
(the same under torch.compile), fp16-cl-compile.

FLOPs are counted by torch's FlopCounterMode on a meta-device copy (forward; and forward
plus the backward the step needs: no gradient for the frozen upsampling or the input).
The baseline is the best rate of an N x N @ N x N bfloat16 matrix product, timed before
the first and after the last measurement. Times are the mean over --steps after
--warmup steps (compilation happens in the warm-up and is reported apart), with the
device synchronised at both ends; peak memory is torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdoc import DOC, write_section  # noqa: E402

from fcn_models import build_fcn  # noqa: E402
from fcn_models.summary import machine  # noqa: E402
from fcn_models.voc import NUM_CLASSES, VOID  # noqa: E402
from pipelines.train import loop, recipe  # noqa: E402
from pipelines.core.params import parse_params  # noqa: E402

SECTION = "## FCNs on a GPU (bench/bench_gpu.py)"
BENCH_NAME = "bench_gpu"
VARIANTS = ("fcn32s", "fcn16s", "fcn8s")
MODES = ("forward", "train whole", "train crops")
# name: (autocast dtype, channels-last, torch.compile)
SETTINGS = {
    "fp32": (torch.float32, False, False),
    "fp16": (torch.float16, False, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16-cl": (torch.bfloat16, True, False),
    "bf16-cl-compile": (torch.bfloat16, True, True),
    "fp16-cl-compile": (torch.float16, True, True),
}
DEFAULT_SETTINGS = ("fp32", "fp16", "bf16", "bf16-cl", "bf16-cl-compile")
# The goals on an H100/H200: FCN-8s forward at 500x500, training throughput with crops, and
# the training step's share of the matrix rate.
GOAL_FORWARD_MS, GOAL_TRAIN_IMAGES_S, GOAL_TRAIN_FRACTION = 5.0, 150.0, 0.30
RANDOM_INIT = recipe.StageInit(source="random", path=None, note="random (benchmark)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int, repeat: int = 5) -> float:
    """The best rate of an n x n @ n x n bfloat16 product on the device, TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n ** 3 / best / 1e12


def bench_params(width: float, crop: int, crop_batch: int):
    """The full profile's training knobs (the reference SGD), no ImageNet file, at this width; the loss
    averaged over pixels: a summed one has float16's grad scaler skip its first twenty-odd steps
    while it finds its scale, and a skipped step is no step to time."""
    return parse_params({"model": {"width": width, "imagenet_weights": None},
                         "augment": {"crop_size": crop},
                         "train": {"batch_mode": "crops", "batch_size": crop_batch, "loss": "mean"}}, "bench params")


def count_flops(variant: str, width: float, batch: int, height: int, width_px: int) -> tuple[int, int]:
    """(forward FLOPs, training-step FLOPs) of one batch: the step's backward computes no gradient for
    the frozen upsampling layers or the input, as in training."""
    with torch.device("meta"):
        model = build_fcn(variant, "vgg16", width=width)
        loop.freeze_for_stage(model, fixed=False)
        x = torch.zeros(batch, 3, height, width_px)
        with FlopCounterMode(display=False) as forward:
            with torch.no_grad():
                model(x)
        with FlopCounterMode(display=False) as step:
            model(x).float().sum().backward()
    return forward.get_total_flops(), step.get_total_flops()


def batch(device, n: int, height: int, width: int, channels_last: bool, generator: torch.Generator):
    images = torch.randn(n, 3, height, width, generator=generator).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (n, height, width), generator=generator)
    labels[:, :2] = VOID  # a void band, as real labels have
    return images, labels.to(device)


def timed(fn, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the warm-up, mean seconds per step after it)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return warm, (time.perf_counter() - start) / steps


def stage_worker(variant: str, params, device: torch.device, dtype, channels_last: bool, compile: str | None):
    """The stage's StageWorker on `device` with autocast to `dtype`; its forward model laid out and
    compiled as asked. Training goes through worker.train_step unchanged."""
    # Random starting weights: the speed of a step does not depend on them.
    config = loop.stage_config(params, variant, RANDOM_INIT)
    worker = loop.StageWorker(config, device, amp_dtype=dtype)
    if channels_last:
        worker.net.to(memory_format=torch.channels_last)
    if compile:
        worker.model = torch.compile(worker.net, backend=compile)
    return worker


def measure(variant: str, setting: str, mode: str, args, device: torch.device, params, generator) -> dict:
    dtype, channels_last, compiled = SETTINGS[setting]
    compile = args.compile_backend if compiled else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    worker = stage_worker(variant, params, device, dtype, channels_last, compile)
    if mode == "train crops":
        n, height, width = args.crop_batch, args.crop, args.crop
    else:
        n, height, width = 1, args.size, args.size
    images, labels = batch(device, n, height, width, channels_last, generator)
    forward_flops, step_flops = count_flops(variant, args.width, n, height, width)
    if mode == "forward":
        net = torch.compile(worker.net, backend=compile) if compile else worker.net
        net.eval()

        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                net(images)
        flops = forward_flops
    else:
        def run():
            worker.train_step(images, labels)
        flops = step_flops
    warm, seconds = timed(run, device, args.warmup, args.steps)
    row = {"variant": variant, "setting": setting, "mode": mode, "batch": n, "size": f"{height}x{width}",
           "ms": seconds * 1e3, "images_s": n / seconds, "tflops": flops / seconds / 1e12, "flops": flops,
           "warmup_s": warm,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    if mode != "forward":
        # Whether the optimizer stepped (a step the grad scaler skips for an inf leaves no momentum).
        learning = [p for p in worker.net.parameters() if p.requires_grad]
        buffers = [worker.optimizer.state.get(p, {}).get("momentum_buffer") for p in learning]
        row["stepped"] = all(b is not None and bool(torch.isfinite(b).all()) for b in buffers) and any(
            bool(b.abs().max() > 0) for b in buffers)
        row["scale"] = worker.scaler.get_scale() if worker.scaler.is_enabled() else None
    return row


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    torch.backends.cudnn.allow_tf32 = False
    params = bench_params(args.width, args.crop, args.crop_batch)
    generator = torch.Generator().manual_seed(0)
    baseline = matmul_tflops(device, args.matmul)
    print(f"{device}: bfloat16 {args.matmul}^3 matmul {baseline:.3g} TFLOP/s", flush=True)
    rows = []
    for variant in args.variants:
        for setting in args.settings:
            for mode in args.modes:
                try:
                    row = measure(variant, setting, mode, args, device, params, generator)
                except torch.OutOfMemoryError:
                    row = {"variant": variant, "setting": setting, "mode": mode, "error": "out of memory"}
                rows.append(row)
                print(format_row(row, baseline), flush=True)
    baseline = max(baseline, matmul_tflops(device, args.matmul))
    return {"device": device, "baseline": baseline, "rows": rows}


def format_row(row: dict, baseline: float) -> str:
    if "error" in row:
        return f"{row['variant']:<7} {row['setting']:<16} {row['mode']:<12} {row['error']}"
    peak = f"{row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else "-"
    return (f"{row['variant']:<7} {row['setting']:<16} {row['mode']:<12} {row['batch']:>3} x {row['size']:<9} "
            f"{row['ms']:9.2f} ms {row['images_s']:9.1f} img/s {row['tflops']:8.3g} TFLOP/s "
            f"{row['tflops'] / baseline:5.2f} of matmul  peak {peak}  warm-up {row['warmup_s']:.1f} s")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return machine()


def goals(result: dict, size: int, crop: int) -> list[str]:
    """Each goal with the best setting's number, met or not."""
    ok = [r for r in result["rows"] if "error" not in r]
    baseline, lines = result["baseline"], []
    forward = [r for r in ok if r["variant"] == "fcn8s" and r["mode"] == "forward"]
    if forward:
        best = min(forward, key=lambda r: r["ms"])
        lines.append(f"FCN-8s forward at {size}x{size}: {best['ms']:.2f} ms ({best['setting']}), goal at most "
                     f"{GOAL_FORWARD_MS:g} ms: {'met' if best['ms'] <= GOAL_FORWARD_MS else 'not met'}")
    crops = [r for r in ok if r["mode"] == "train crops"]
    if crops:
        best = max(crops, key=lambda r: r["images_s"])
        lines.append(f"training with {crop}x{crop} crops: {best['images_s']:.0f} images/s ({best['variant']}, "
                     f"{best['setting']}), goal at least {GOAL_TRAIN_IMAGES_S:g}: "
                     f"{'met' if best['images_s'] >= GOAL_TRAIN_IMAGES_S else 'not met'}")
    steps = [r for r in ok if r["mode"] != "forward"]
    if steps:
        best = max(steps, key=lambda r: r["tflops"])
        fraction = best["tflops"] / baseline
        lines.append(f"training step: {fraction:.2f} of the matmul rate ({best['variant']}, {best['setting']}, "
                     f"{best['mode']}), goal at least {GOAL_TRAIN_FRACTION:.2f}: "
                     f"{'met' if fraction >= GOAL_TRAIN_FRACTION else 'not met'}")
    return lines


def format_report(result: dict, args) -> str:
    baseline = result["baseline"]
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {device_name(result['device'])}.",
        f"VGG16 trunk, width {args.width:g}; forward and `train whole` on {args.size}x{args.size} images, batch 1; "
        f"`train crops` on batches of {args.crop_batch} crops of {args.crop}x{args.crop}. Mean of {args.steps} steps "
        f"after {args.warmup} warm-up steps. Baseline: the {args.matmul}^3 bfloat16 matrix product, "
        f"best {baseline:.3g} TFLOP/s.",
        "",
        "| network | setting | mode | batch | ms | images/s | TFLOP/s | fraction of matmul | peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['setting']} | {r['mode']} | | {r['error']} | | | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['setting']} | {r['mode']} | {r['batch']} | {r['ms']:.2f} | "
                     f"{r['images_s']:.1f} | {r['tflops']:.3g} | {r['tflops'] / baseline:.2f} | {peak} |")
    lines += ["", *(f"- {line}" for line in goals(result, args.size, args.crop))]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--size", type=int, default=500, help="whole-image side (default: %(default)s)")
    parser.add_argument("--crop", type=int, default=512, help="crop side (default: %(default)s)")
    parser.add_argument("--crop-batch", type=int, default=16, help="crops per batch (default: %(default)s)")
    parser.add_argument("--width", type=float, default=1.0, help="model.width (default: %(default)s, the paper's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--matmul", type=int, default=8192, help="side of the baseline product")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if there is one)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for the -compile settings (default: %(default)s; aot_eager "
                             "traces the same graphs without generating kernels, for a quick check)")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(ROOT)}")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    report = format_report(result, args)
    print()
    print(report)
    if not args.no_write:
        write_section(SECTION, BENCH_NAME, report)
        print(f"\nwrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
