"""Forward and forward+backward speed of FCN-32s/16s/8s (VGG16, width 1.0, 500x500, batch 1, float32)
on this machine, as a fraction of the rate of a large float32 matrix product measured in the same run.

    .venv/bin/python bench/bench_models.py            # prints the table, updates docs/BENCHMARKS.md
    .venv/bin/python bench/bench_models.py --no-write --variants fcn32s --repeat 1

FLOPs are counted from the layer shapes by torch's FlopCounterMode on a meta-device copy
(convolutions and transposed convolutions; FLOPs = 2 x multiply-adds). The baseline is the
4096 x 4096 @ 4096 x 4096 float32 product as oneDNN (which runs the convolutions) computes it,
timed right before and after every measured run, so that load from other processes slows
both sides of each ratio alike; torch.mm (MKL sgemm) is reported for reference.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdoc import DOC, publish  # noqa: E402

from fcn_models import build_fcn, optimize_for_inference  # noqa: E402
from fcn_models.summary import machine  # noqa: E402

SECTION = "## Model forward/backward (bench/bench_models.py)"
BENCH_NAME = "bench_models"  # its markers in docs/BENCHMARKS.md
MATMUL_N = 4096


class Baseline:
    """The 4096^3 float32 product as oneDNN runs it (a 1x1 convolution of 4096 channels over
    64x64 pixels, channels-last): the library that runs the network's convolutions."""

    def __init__(self):
        self.x = torch.randn(1, MATMUL_N, 64, 64).to(memory_format=torch.channels_last)
        self.w = torch.randn(MATMUL_N, MATMUL_N, 1, 1).to(memory_format=torch.channels_last)
        self.best = 0.0
        self.rate()  # warm-up

    def rate(self) -> float:
        """GFLOP/s of one run, now."""
        with torch.inference_mode():
            start = time.perf_counter()
            torch.nn.functional.conv2d(self.x, self.w)
            rate = 2 * MATMUL_N ** 3 / (time.perf_counter() - start) / 1e9
        self.best = max(self.best, rate)
        return rate


def mkl_matmul_gflops(repeat: int = 3) -> float:
    """torch.mm of the same size (MKL sgemm), best of a few: for reference."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeat))
    return 2 * MATMUL_N ** 3 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(fn, flops: int, baseline: Baseline, repeat: int) -> tuple[float, float]:
    """(best seconds, median fraction of the baseline) over `repeat` runs after a warm-up.

    Each run sits between two baseline runs and is compared with the faster of them,
    so load from other processes slows both sides of each ratio alike.
    """
    fn()  # warm-up: allocations, oneDNN kernel selection, compilation
    times, fractions = [], []
    for _ in range(repeat):
        before = baseline.rate()
        seconds = _seconds(fn)
        after = baseline.rate()
        times.append(seconds)
        fractions.append(flops / seconds / 1e9 / max(before, after))
    return min(times), statistics.median(fractions)


def count_flops(variant: str, size: int) -> tuple[int, int]:
    """(forward FLOPs, forward+backward FLOPs) for one size x size image."""
    with torch.device("meta"):
        model = build_fcn(variant, "vgg16")
        x = torch.zeros(1, 3, size, size)
        with FlopCounterMode(display=False) as fwd:
            model(x)
        with FlopCounterMode(display=False) as both:
            model(x).sum().backward()
    return fwd.get_total_flops(), both.get_total_flops()


def forward_fn(model, x):
    def run():
        with torch.inference_mode():
            model(x)
    return run


def train_step_fn(model, x):
    def run():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return run


def layer_times(model, x, repeat: int) -> list[tuple[str, float, float]]:
    """(layer, best seconds, FLOPs) for the trunk's convolutions and pools in an optimised forward pass."""
    rows = []
    with torch.inference_mode():
        h = x
        for name, layer in model.trunk.named_children():
            out = layer(h)
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
                flops = (2 * out.numel() * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
                         if isinstance(layer, nn.Conv2d) else 0)
                layer(h)  # warm-up
                rows.append((name, min(_seconds(lambda: layer(h)) for _ in range(repeat)), flops))
            h = out
    return rows


def run(variants, size: int, repeat: int, try_compile: bool, layers: bool):
    torch.manual_seed(0)
    baseline = Baseline()
    mkl = mkl_matmul_gflops()
    print(f"baseline (oneDNN) {baseline.rate():.1f} GFLOP/s, torch.mm (MKL) {mkl:.1f} GFLOP/s", flush=True)
    results, builds, layer_rows = [], [], None
    for variant in variants:
        fwd_flops, both_flops = count_flops(variant, size)
        model = build_fcn(variant, "vgg16")
        x = torch.randn(1, 3, size, size)
        measured = []
        model.eval()
        measured.append(("forward, eager (NCHW)", fwd_flops, *paired(forward_fn(model, x), fwd_flops, baseline, repeat)))
        optimize_for_inference(model)
        measured.append(("forward, optimize_for_inference", fwd_flops,
                         *paired(forward_fn(model, x), fwd_flops, baseline, repeat)))
        if try_compile:
            start = time.perf_counter()
            compiled = optimize_for_inference(model, compile=True)
            out = compiled(x)
            builds.append(time.perf_counter() - start)
            with torch.inference_mode():
                if not torch.allclose(out, model(x), atol=1e-3, rtol=1e-3):
                    raise SystemExit(f"{variant}: the compiled model's scores differ from eager mode")
            measured.append(("forward, optimize_for_inference(compile=True)", fwd_flops,
                             *paired(forward_fn(compiled, x), fwd_flops, baseline, repeat)))
            del compiled
        if layers and variant == variants[0]:
            layer_rows = layer_times(model, x, repeat)
        model.train()
        steps = max(1, repeat - 1)
        measured.append(("forward+backward, channels-last", both_flops,
                         *paired(train_step_fn(model, x), both_flops, baseline, steps)))
        if variant == variants[0]:
            model.to(memory_format=torch.contiguous_format)
            measured.append(("forward+backward, eager (NCHW)", both_flops,
                             *paired(train_step_fn(model, x), both_flops, baseline, steps)))
        for mode, flops, seconds, fraction in measured:
            results.append((variant, mode, seconds, flops, fraction))
            print(f"{variant:<7} {mode:<46} {seconds * 1000:8.0f} ms  {flops / 1e9:7.1f} GFLOP  "
                  f"{flops / seconds / 1e9:6.1f} GFLOP/s  {fraction:5.2f} of the baseline", flush=True)
        del model
    mkl = max(mkl, mkl_matmul_gflops())
    spread = f"{min(builds):.0f}-{max(builds):.0f}" if len(builds) > 1 else f"{builds[0]:.0f}" if builds else ""
    compile_note = f"Compiling (the first call at a new input size) took {spread} s" if builds else None
    return {"oneDNN": baseline.best, "MKL": mkl}, results, compile_note, layer_rows


def format_report(baselines, results, compile_note, layer_rows, size, repeat) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {machine()}.",
        f"VGG16 trunk, width 1.0, {size}x{size} input, batch 1, float32; times are the best of {repeat} runs "
        "after a warm-up (forward+backward: of " + str(max(1, repeat - 1)) + ").",
        f"Baseline: the {MATMUL_N}x{MATMUL_N} @ {MATMUL_N}x{MATMUL_N} float32 product run by oneDNN "
        f"(as a 1x1 convolution), timed before and after every run; best seen {baselines['oneDNN']:.1f} GFLOP/s "
        f"(torch.mm, i.e. MKL sgemm: {baselines['MKL']:.1f} GFLOP/s). The fraction is each run's rate over "
        "the faster of its two neighbouring baseline runs, median over runs.",
        "",
        "| network | mode | ms | GFLOP | GFLOP/s | fraction of matmul |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for variant, mode, seconds, flops, fraction in results:
        lines.append(f"| {variant} | {mode} | {seconds * 1000:.0f} | {flops / 1e9:.1f} | "
                     f"{flops / seconds / 1e9:.1f} | {fraction:.2f} |")
    if compile_note:
        lines += ["", compile_note + "."]
    if layer_rows:
        lines += ["", f"Per layer, {results[0][0]} forward after optimize_for_inference (eager; trunk "
                  "convolutions and pools; best of "
                  f"{repeat}, fraction of the best baseline rate seen, so a lower bound):", "",
                  "| layer | ms | GFLOP | fraction of matmul |", "|---|---:|---:|---:|"]
        for name, seconds, flops in layer_rows:
            fraction = f"{flops / seconds / 1e9 / baselines['oneDNN']:.2f}" if flops else "-"
            lines.append(f"| {name} | {seconds * 1000:.1f} | {flops / 1e9:.1f} | {fraction} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["fcn32s", "fcn16s", "fcn8s"],
                        choices=["fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce"])
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled forward (slow to build)")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer breakdown")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    baselines, results, compile_note, layer_rows = run(args.variants, args.size, args.repeat, not args.no_compile,
                                                       not args.no_layers)
    report = format_report(baselines, results, compile_note, layer_rows, args.size, args.repeat)
    publish(SECTION, BENCH_NAME, report, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
