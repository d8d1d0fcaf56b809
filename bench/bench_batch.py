"""Batch inference throughput: `fcn predict-batch` (Ray Data, an actor pool) against the best
one-process loop on the same images, and where each side's time goes.

    .venv/bin/python bench/bench_batch.py             # prints the tables, updates docs/BENCHMARKS.md
    .venv/bin/python bench/bench_batch.py --no-write --images 8 --rounds 1   # a quick check

Both sides do the same work per image: decode a VOC-sized JPEG, segment it with an
FCN-8s (VGG16 at the demo's width 1/8; random weights with random score layers, so
that masks hold several classes as a trained net's do), write the palette mask PNG
and the overlay PNG, and compute the class shares.

  loop       the baseline at its best, in this process: the model loaded once
             (FCNSegmenter, as serving loads it), a thread decoding the next image while
             the current one is segmented, and a thread encoding and writing the PNGs of
             the previous one (PIL and zlib release the GIL), with 1 and with all cores'
             torch threads: the faster of the two is the baseline
  ray        pipelines.serve.batch.run_batch on a local Ray started beforehand (as a cluster
             already running, or `ray job submit`, has it), one actor per core with one
             torch thread each; the actors' start-up (importing torch, loading the
             weights) is inside the time, as a user pays it

Breakdown: both sides run the same functions (pipelines.serve.images, fcn_models.palette,
FCNSegmenter.segment), timed by wrappers installed in the loop's process and, for Ray, in
each actor (a Segmenter subclass that installs them and appends each call's times to a
file). The phases: decode; forward (segment: normalise, the network, argmax); mask and
overlay images (the palette image and the blended overlay); PNG encoding; writing the
files; the rest of the work per image (class shares, bookkeeping). Each is milliseconds
per image summed over all threads or actors, so with work running side by side the
phases add up to more than the wall time per image.

Rounds alternate the sides, the side going first alternating, so load from other
processes falls on all of them; each side's fastest round counts (its breakdown with
it). Images/s is images over the wall time of the call. The load average is quoted from
before and after.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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

SECTION = "## Batch inference (bench/bench_batch.py)"
BENCH_NAME = "bench_batch"
GOAL = 1.0  # Ray Data may not cost more than overlapping decode, compute and writing gives back


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


# --------------------------------------------------------------------------- phase timing

PHASES = ("decode", "forward", "mask and overlay images", "PNG encoding", "writing", "rest")


class Phases:
    """Seconds per phase, summed over the threads that run them."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES + ("per image",), 0.0)
        self.lock = threading.Lock()

    def add(self, phase: str, seconds: float) -> None:
        with self.lock:
            self.seconds[phase] += seconds

    def wrap(self, phase: str, fn):
        def timed_fn(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)
        return timed_fn

    def take(self) -> dict:
        with self.lock:
            out, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        # The PNG's seconds include the write inside save_png; the rest is what the
        # whole image took beyond the named phases.
        out["PNG encoding"] -= out["writing"]
        out["rest"] = out.pop("per image") - sum(out[p] for p in PHASES if p != "rest")
        return out


def instrument(phases: Phases, segmenter) -> None:
    """Time the functions both sides call, where they are looked up at call time."""
    from fcn_models import palette
    from pipelines.serve import images

    images.decode_image = phases.wrap("decode", images.decode_image)
    images.mask_image = phases.wrap("mask and overlay images", images.mask_image)
    palette.overlay = phases.wrap("mask and overlay images", palette.overlay)
    images.save_png = phases.wrap("PNG encoding", images.save_png)
    images.atomic_write_bytes = phases.wrap("writing", images.atomic_write_bytes)  # save_png's write
    segmenter.segment = phases.wrap("forward", segmenter.segment)


def timed_segmenter(timings: Path):
    """A batch.Segmenter that times its phases and appends each call's to timings/<pid>.jsonl
    (defined here, so Ray ships it to the actors by value)."""

    class TimedSegmenter(batch.Segmenter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.phases = Phases()
            instrument(self.phases, self.model)

        def one(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super().one(*args, **kwargs)
            finally:
                self.phases.add("per image", time.perf_counter() - start)

        def __call__(self, rows):
            out = super().__call__(rows)
            with open(timings / f"{os.getpid()}.jsonl", "a") as fh:
                fh.write(json.dumps(self.phases.take()) + "\n")
            return out

    return TimedSegmenter


def read_timings(timings: Path) -> dict:
    total = dict.fromkeys(PHASES, 0.0)
    for file in timings.glob("*.jsonl"):
        for line in file.read_text().splitlines():
            for phase, seconds in json.loads(line).items():
                total[phase] += seconds
    shutil.rmtree(timings)
    timings.mkdir()
    return total


# --------------------------------------------------------------------------- the two sides

def run_loop(files: list[Path], ckpt: Path, out: Path, threads: int) -> tuple[float, dict]:
    """The one-process loop: (seconds, phase seconds). Decoding runs a file ahead and the PNGs
    a file behind, each in a thread, while this thread runs the network."""
    from fcn_models import palette
    from PIL import Image
    from pipelines.serve import images
    from pipelines.serve.pyfunc_model import FCNSegmenter

    torch.set_num_threads(threads)
    phases = Phases()
    originals = {name: getattr(images, name) for name in ("decode_image", "mask_image", "save_png",
                                                            "atomic_write_bytes")}, palette.overlay
    start = time.perf_counter()
    model = FCNSegmenter().load(ckpt, device="cpu")
    instrument(phases, model)
    out.mkdir(parents=True, exist_ok=True)

    def decode(path: Path):
        begin = time.perf_counter()
        image = images.decode_image(path, str(path), model.max_pixels)
        return image, time.perf_counter() - begin

    def write(name: str, image, mask, work_before: float) -> None:
        begin = time.perf_counter()
        images.save_png(images.mask_image(mask), out / f"{name}_mask.png")
        images.save_png(Image.fromarray(palette.overlay(image, mask, 0.5)), out / f"{name}_overlay.png")
        np.bincount(mask.ravel(), minlength=model.model.num_classes)
        phases.add("per image", work_before + time.perf_counter() - begin)

    try:
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            ahead, behind = reader.submit(decode, files[0]), []
            for i, path in enumerate(files):
                image, decode_s = ahead.result()
                if i + 1 < len(files):
                    ahead = reader.submit(decode, files[i + 1])
                begin = time.perf_counter()
                mask = model.segment(image)
                behind.append(writer.submit(write, path.stem, image, mask, decode_s + time.perf_counter() - begin))
                if len(behind) > 2:  # at most two images' PNGs waiting
                    behind.pop(0).result()
            for job in behind:
                job.result()
        seconds = time.perf_counter() - start
    finally:
        for name, fn in originals[0].items():
            setattr(images, name, fn)
        palette.overlay = originals[1]
    return seconds, phases.take()


def run_ray(inputs: dict, ckpt: Path, out: Path, actors: int, timings: Path) -> tuple[float, dict]:
    plain = batch.Segmenter
    batch.Segmenter = timed_segmenter(timings)
    try:
        start = time.perf_counter()
        batch.run_batch(inputs, ckpt, out, actors=actors)
        seconds = time.perf_counter() - start
    finally:
        batch.Segmenter = plain
    return seconds, read_timings(timings)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} / {five:.1f}"


def run(count: int, rounds: int, width: float):
    import ray
    from ray.data import DataContext

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as scratch:
        scratch = Path(scratch)
        files = make_images(scratch / "images", count)
        ckpt = make_checkpoint(scratch / "ckpt", width)
        timings = scratch / "timings"
        timings.mkdir()
        cluster.connect(parse_params({"ray": {"num_workers": 1, "cpus_per_worker": 1.0,
                                              "data_cpus": max(1.0, cores - 1.0)}}).ray)
        DataContext.get_current().enable_progress_bars = False
        inputs = batch.list_inputs(str(scratch / "images"))
        sides = {f"loop, {t} torch thread{'s' if t > 1 else ''}": (lambda t=t: run_loop(files, ckpt, scratch / "out", t))
                 for t in sorted({1, cores})}
        sides[f"ray, {cores} actors"] = lambda: run_ray(inputs, ckpt, scratch / "out", cores, timings)
        results = {name: [] for name in sides}
        loads = [load()]
        for round_ in range(rounds):
            for name in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
                results[name].append(sides[name]())
                shutil.rmtree(scratch / "out")
                print(f"round {round_ + 1}: {name}: {results[name][-1][0]:.1f} s", flush=True)
        loads.append(load())
        ray.shutdown()
    return results, cores, loads


def format_report(results, cores, count, rounds, width, loads) -> str:
    best = {name: min(runs, key=lambda r: r[0]) for name, runs in results.items()}
    loops = [name for name in best if name.startswith("loop")]
    base_name = min(loops, key=lambda n: best[n][0])
    baseline = best[base_name][0]
    ray_name = next(name for name in best if name.startswith("ray"))
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {cpu_model()}, {cores} cores, torch {torch.__version__}.",
        f"{count} JPEGs (longer side 500), FCN-8s on VGG16 at width {width}; each image decoded, segmented, its "
        "mask and overlay PNGs written, its class shares computed. The loop decodes a file ahead and writes a "
        f"file behind in threads. Fastest of {rounds} rounds, the sides interleaved; the baseline is the faster "
        f"loop ({base_name}). Load average (1 / 5 min) before and after: {loads[0]}, {loads[1]}.",
        "",
        "| run | s | images/s | vs the loop at its best |",
        "|---|---:|---:|---:|",
    ]
    for name, (seconds, _) in best.items():
        lines.append(f"| {name} | {seconds:.1f} | {count / seconds:.1f} | {baseline / seconds:.2f} |")
    ratio = baseline / best[ray_name][0]
    lines += ["", f"Goal: at least {GOAL}x the loop on this machine; measured {ratio:.2f}x "
                  f"({'met' if ratio >= GOAL else 'not met'}).", "",
              "Where the time goes, ms per image summed over threads (loop) or actors (ray), from each side's "
              "fastest round; \"wall\" is the run's seconds per image:", "",
              "| phase | " + " | ".join(best) + " |",
              "|---|" + "---:|" * len(best)]
    for phase in PHASES:
        lines.append(f"| {phase} | " + " | ".join(f"{1000 * phases[phase] / count:.1f}" for _, phases in best.values())
                     + " |")
    lines.append("| sum of the phases | " + " | ".join(f"{1000 * sum(phases.values()) / count:.1f}"
                                                     for _, phases in best.values()) + " |")
    lines.append("| wall | " + " | ".join(f"{1000 * seconds / count:.1f}" for seconds, _ in best.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="at least 3 for the doc")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    results, cores, loads = run(args.images, args.rounds, args.width)
    report = format_report(results, cores, args.images, args.rounds, args.width, loads)
    publish(SECTION, BENCH_NAME, report, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
