"""Preprocessing throughput and memory as the dataset grows.

Generates mirrors of 1x, 2x and 4x a base size (VOC-like pictures, longer side 500),
extracts them as fetch does, and times `preprocess` on each in a fresh process, while
a sampler thread adds up the RSS and CPU time of that process and its pool workers.
The baseline is the 1x run of the same invocation: past a fixed start-up cost, time
should grow linearly with size (a straight-line fit gives both), and peak memory should
stay flat (ratio near 1.0). One more row runs 1x with a single worker, in-process, to
show what the pool costs and buys.

    .venv/bin/python bench/bench_preprocess.py [--base 200] [--scales 1 2 4] [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VAL_SHARE = 0.2  # of the base size; the rest is SBD train


def run_child(raw: str, out: str, workers: int) -> None:
    """One preprocess run; prints its wall time as JSON (the parent measures memory)."""
    from pipelines.data.build_shards import preprocess
    started = time.perf_counter()
    stats = preprocess(Path(raw), Path(out) / "shards", Path(out) / "stats.json", Path(out) / "rejected.json",
                       workers=workers, progress_every=10**9)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "images": stats["train"]["images"] + stats["val"]["images"]}))


def sample_tree(process: psutil.Process, cpu_by_pid: dict[int, float]) -> int:
    """RSS of a process and all its descendants now; records each one's CPU seconds so far."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            with p.oneshot():
                total += p.memory_info().rss
                times = p.cpu_times()
            cpu_by_pid[p.pid] = times.user + times.system
        except psutil.Error:
            pass  # a process that just exited
    return total


def measure(raw: Path, out: Path, workers: int) -> dict:
    """Run one preprocess in a fresh process; its time, and the peak RSS and CPU time of its whole tree.

    The pool workers are not the run's own children (a fork server starts them), so
    their memory and CPU are sampled every 20 ms rather than read from rusage; CPU time
    is far less disturbed than wall time when other jobs share the cores.
    """
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", str(raw), str(out), str(workers)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    peak, cpu_by_pid = 0, {}
    done = threading.Event()

    def sample():
        nonlocal peak
        parent = psutil.Process(child.pid)
        while not done.is_set():
            try:
                peak = max(peak, sample_tree(parent, cpu_by_pid))
            except psutil.Error:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"preprocess on {raw} failed (exit {child.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "peak_rss": peak, "cpu_seconds": sum(cpu_by_pid.values())}


def make_raw(work: Path, total: int, max_side: int) -> Path:
    """A generated mirror of `total` images, extracted; reused from an earlier run in the same workdir."""
    from pipelines.data.archives import safe_extract
    from pipelines.data.synthetic import SBD_ARCHIVE, VOC_ARCHIVE, write_mirror
    n_val = max(1, round(total * VAL_SHARE))
    mirror_dir = work / f"mirror-{total}-{max_side}"
    archives = [mirror_dir / VOC_ARCHIVE, mirror_dir / SBD_ARCHIVE]
    if not all(a.is_file() for a in archives):  # the mirror is deterministic: same arguments, same files
        write_mirror(mirror_dir, n_train=total - n_val, n_val=n_val, seed=0, max_side=max_side)
    raw = work / f"raw-{total}-{max_side}"
    for archive in archives:
        safe_extract(archive, raw)  # skipped when already extracted
    return raw


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import PIL
    import pyarrow
    import scipy
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
            f"Pillow {PIL.__version__}, pyarrow {pyarrow.__version__}, scipy {scipy.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=200, help="images at 1x (train + val)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--workers", type=int, default=0, help="pool size (0 = all cores)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per size; the fastest counts")
    parser.add_argument("--workdir", type=Path, default=None, help="keep mirrors here (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"machine: {machine()}")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"generating mirrors of {', '.join(str(args.base * s) for s in args.scales)} images "
              f"(longer side {args.max_side}) ...", flush=True)
        raws = {s: make_raw(work, args.base * s, args.max_side) for s in args.scales}

        # Rounds over every configuration, so a burst of load from other jobs hits all
        # sizes alike rather than one of them.
        runs = [(s, args.workers) for s in args.scales] + [(args.scales[0], 1)]
        results = {run: [] for run in runs}
        for r in range(args.repeat):
            for scale, workers in runs:
                results[(scale, workers)].append(
                    measure(raws[scale], work / f"out-{scale}-{workers}-{r}", workers))
        rows = []
        for (scale, workers), rs in results.items():
            # the fastest run is the one least disturbed by other jobs; memory is the worst seen
            rows.append((scale, workers, {"images": rs[0]["images"],
                                          "seconds": min(r["seconds"] for r in rs),
                                          "cpu_seconds": min(r["cpu_seconds"] for r in rs),
                                          "peak_rss": max(r["peak_rss"] for r in rs)}))
            times = ", ".join(f"{r['seconds']:.2f}" for r in rs)
            print(f"  {scale}x workers={workers or 'all'}: {rs[0]['images']} images in {times} s", flush=True)

        base = rows[0][2]
        print()
        print("| size | images | workers | wall s | images/s | wall vs 1x | wall / (scale x 1x) "
              "| CPU s | CPU ms/image | CPU / (scale x 1x) | peak RSS MiB (process tree) | RSS vs 1x |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for scale, workers, r in rows:
            wall, cpu = r["seconds"] / base["seconds"], r["cpu_seconds"] / base["cpu_seconds"]
            print(f"| {scale}x | {r['images']} | {workers or len(os.sched_getaffinity(0))} | {r['seconds']:.2f} "
                  f"| {r['images'] / r['seconds']:.0f} | {wall:.2f} | {wall / scale:.2f} "
                  f"| {r['cpu_seconds']:.2f} | {1000 * r['cpu_seconds'] / r['images']:.1f} | {cpu / scale:.2f} "
                  f"| {r['peak_rss'] / 2**20:.0f} | {r['peak_rss'] / base['peak_rss']:.2f} |")
        print()
        # time = start-up + images / rate: a straight line through the pooled runs
        pooled = [r for _, w, r in rows if w == args.workers]
        for key, unit in (("seconds", "wall"), ("cpu_seconds", "CPU")):
            slope, intercept = np.polyfit([r["images"] for r in pooled], [r[key] for r in pooled], 1)
            print(f"{unit} time fit: {intercept:.2f} s start-up + {1000 * slope:.2f} ms/image "
                  f"({1 / slope:.0f} images/s after start-up)")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"goals: >= 100 images/s: {'met' if min(r['images'] / r['seconds'] for r in pooled) >= 100 else 'NOT met'}; "
              f"peak RSS within 10% of 1x: "
              f"{'met' if max(r['peak_rss'] for r in pooled) <= 1.1 * base['peak_rss'] else 'NOT met'}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        run_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
