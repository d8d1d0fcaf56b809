"""Batch inference throughput: `fcn predict-batch` (Ray Data, an actor pool) against the plain
one-process loop of `fcn predict` on the same images.

    .venv/bin/python bench/bench_batch.py             # prints the table, updates docs/BENCHMARKS.md
    .venv/bin/python bench/bench_batch.py --no-write

Both sides do the same work per image: decode a VOC-sized JPEG, segment it with an
FCN-8s (VGG16 at the demo's width 1/8; random weights with random score layers, so
that masks hold several classes as a trained net's do), write the palette mask PNG
and the overlay PNG, and compute the class shares.

  loop       pipelines.serve.segment_files.predict over all the files in this process, with
             1 and with all torch threads: the better of the two is the baseline
  ray        pipelines.serve.batch.run_batch on a local Ray started beforehand (as a cluster
             already running, or `ray job submit`, has it), one actor per core with one
             torch thread each; the actors' start-up (importing torch, loading the
             weights) is inside the time, as a user pays it

Rounds alternate loop and ray, so load from other processes falls on both; each side's
fastest round counts. Images/s is images over the wall time of the call.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdoc import publish  # noqa: E402

from fcn_models.checkpoint import save_checkpoint  # noqa: E402
from fcn_models.fcn import build_fcn  # noqa: E402
from fcn_models.summary import cpu_model  # noqa: E402
from pipelines.train import cluster  # noqa: E402
from pipelines.core.params import parse_params  # noqa: E402
from pipelines.serve import batch  # noqa: E402
from pipelines.serve.segment_files import predict  # noqa: E402

SECTION = "## Batch inference (bench/bench_batch.py)"
BENCH_NAME = "bench_batch"
GOAL = 1.6


def make_images(directory: Path, count: int) -> list[Path]:
    """VOC-sized JPEGs (longer side 500) of smooth colour fields and rectangles."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        height, width = (375, 500) if i % 2 else (500, int(rng.integers(330, 480)))
        yy, xx = np.mgrid[0:height, 0:width]
        image = np.stack([(yy * rng.uniform(0.2, 0.6) + xx * rng.uniform(0.1, 0.4)) % 256] * 3, -1)
        image = (image * rng.uniform(0.5, 1.0, 3)).astype(np.uint8)
        for _ in range(4):
            y, x = int(rng.integers(0, height - 60)), int(rng.integers(0, width - 60))
            image[y:y + int(rng.integers(30, 160)), x:x + int(rng.integers(30, 160))] = rng.integers(0, 256, 3)
        files.append(directory / f"img_{i:05d}.jpg")
        Image.fromarray(image).save(files[-1], quality=90)
    return files


def make_checkpoint(directory: Path, width: float) -> Path:
    torch.manual_seed(0)
    model = build_fcn("fcn8s", width=width)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("score"):
                param.normal_(0, 0.5)
    return save_checkpoint(directory, model)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(count: int, rounds: int, width: float):
    import ray
    from ray.data import DataContext

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as scratch:
        scratch = Path(scratch)
        files = make_images(scratch / "images", count)
        ckpt = make_checkpoint(scratch / "ckpt", width)
        cluster.connect(parse_params({"ray": {"num_workers": 1, "cpus_per_worker": 1.0,
                                              "data_cpus": max(1.0, cores - 1.0)}}).ray)
        DataContext.get_current().enable_progress_bars = False
        inputs = batch.list_inputs(str(scratch / "images"))
        results = {"loop, 1 torch thread": [], f"loop, {cores} torch threads": [], f"ray, {cores} actors": []}
        for _ in range(rounds):
            for threads in (1, cores):
                torch.set_num_threads(threads)
                out = scratch / "loop"
                results[f"loop, {threads} torch thread" + ("s" if threads > 1 else "")].append(
                    timed(lambda: predict(files, str(ckpt), out)))
                shutil.rmtree(out)
            torch.set_num_threads(cores)
            out = scratch / "ray"
            results[f"ray, {cores} actors"].append(timed(lambda: batch.run_batch(inputs, ckpt, out, actors=cores)))
            shutil.rmtree(out)
            print({k: [round(v, 1) for v in vs] for k, vs in results.items()}, flush=True)
        ray.shutdown()
    return results, cores


def format_report(results, cores, count, rounds, width) -> str:
    best = {k: min(v) for k, v in results.items()}
    baseline = min(v for k, v in best.items() if k.startswith("loop"))
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {cpu_model()}, {cores} cores, torch {torch.__version__}.",
        f"{count} JPEGs (longer side 500), FCN-8s on VGG16 at width {width}; each image decoded, segmented, its "
        "mask and overlay PNGs written, its class shares computed. Fastest of "
        f"{rounds} alternating rounds; the baseline is the faster loop.",
        "",
        "| run | s | images/s | vs the loop at its best |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in best.items():
        lines.append(f"| {name} | {seconds:.1f} | {count / seconds:.1f} | {baseline / seconds:.2f} |")
    ratio = baseline / best[f"ray, {cores} actors"]
    lines += ["", f"Goal: at least {GOAL}x the loop on this machine; measured {ratio:.2f}x "
                  f"({'met' if ratio >= GOAL else 'not met'})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    results, cores = run(args.images, args.rounds, args.width)
    report = format_report(results, cores, args.images, args.rounds, args.width)
    publish(SECTION, BENCH_NAME, report, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
