"""Time per image of the exported ONNX model in onnxruntime against PyTorch eager, both on the CPU.

    .venv/bin/python bench/bench_onnx.py             # prints the table, updates docs/BENCHMARKS.md
    .venv/bin/python bench/bench_onnx.py --no-write

The same FCN-8s checkpoint (random weights: time does not depend on them), exported by
`fcn export`'s code (pipelines/serve/onnx_export.py), on the same uint8 images, each side
doing what a caller gets: PyTorch eager is pipelines.serve.pyfunc_model's FCNSegmenter.segment
(normalise, forward, argmax), onnxruntime one session.run of the graph (normalisation
and argmax inside). Runs alternate between the two, so load from other processes
falls on both; each side's median and best over --repeat runs count, and the ratio is
PyTorch's time over onnxruntime's.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
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
from fcn_models.summary import machine  # noqa: E402
from pipelines.serve.onnx_export import _session, export_onnx, run_onnx  # noqa: E402
from pipelines.serve.pyfunc_model import FCNSegmenter  # noqa: E402

SECTION = "## ONNX export (bench/bench_onnx.py)"
BENCH_NAME = "bench_onnx"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(widths, size, repeat):
    import onnxruntime

    rows = []
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    for width in widths:
        with tempfile.TemporaryDirectory() as scratch:
            torch.manual_seed(0)
            save_checkpoint(Path(scratch) / "ckpt", build_fcn("fcn8s", width=width))
            start = time.perf_counter()
            export_onnx(Path(scratch) / "ckpt", Path(scratch) / "m.onnx")
            export_s = time.perf_counter() - start
            segmenter = FCNSegmenter().load(Path(scratch) / "ckpt", device="cpu")
            session = _session(Path(scratch) / "m.onnx")
            segmenter.segment(image), run_onnx(session, image)  # warm-up
            times = {"torch": [], "onnx": []}
            for _ in range(repeat):
                times["torch"].append(timed(lambda: segmenter.segment(image)))
                times["onnx"].append(timed(lambda: run_onnx(session, image)))
            assert np.array_equal(segmenter.segment(image), run_onnx(session, image)[1])
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        rows.append((width, med, best, export_s))
        print(f"width {width}: torch {med['torch'] * 1000:.0f} ms, onnxruntime {med['onnx'] * 1000:.0f} ms "
              f"(median of {repeat}); export {export_s:.1f} s", flush=True)
    return rows, onnxruntime.__version__


def format_report(rows, ort_version, size, repeat) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {machine()}, onnxruntime {ort_version} "
        "(CPUExecutionProvider, default threads).",
        f"FCN-8s on VGG16, one {size[1]}x{size[0]} uint8 RGB image per call, {repeat} calls each, alternating; "
        "ms per image, median (best).",
        "",
        "| width | PyTorch eager ms | onnxruntime ms | PyTorch / onnxruntime (median) | export s |",
        "|---|---:|---:|---:|---:|",
    ]
    for width, med, best, export_s in rows:
        lines.append(f"| {width} | {med['torch'] * 1000:.0f} ({best['torch'] * 1000:.0f}) | "
                     f"{med['onnx'] * 1000:.0f} ({best['onnx'] * 1000:.0f}) | {med['torch'] / med['onnx']:.2f} | "
                     f"{export_s:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.125, 1.0])
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rows, version = run(args.widths, (args.height, args.width), args.repeat)
    report = format_report(rows, version, (args.height, args.width), args.repeat)
    publish(SECTION, BENCH_NAME, report, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
