"""Training speed to the last iteration: the demo's FCN-8s stage, iterations/s per window.

    .venv/bin/python bench/bench_subnormals.py [--params params.yaml] [--iterations 4000] [--window 500]
                                               [--no-flush]

Run after `make demo` (params.yaml is then the demo's): trains FCN-8s from the demo's
FCN-16s best checkpoint (<train.models_dir>/fcn16s) with the stage's own step,
pipelines.train.loop's `StageWorker.train_step`, its optimizer, learning rate and
torch threads (ray.cpus_per_worker), on the demo's training images decoded and flipped
as the train pipeline does (pipelines.data.dataset.DecodeAugment, one pass decoded up
front so that decoding takes no time from the steps), in this process (OMP_WAIT_POLICY
from the environment, as the local cluster's workers inherit it). It reports iterations/s for
each window and the last window's rate over the first's: a stage that slows down as
it goes (subnormal weights and optimizer moments) shows a ratio well below 1.
--no-flush trains without zeroing subnormals, as the loop did before.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdoc import publish  # noqa: E402
from fcn_models import subnormals  # noqa: E402
from fcn_models.preprocess import normalize  # noqa: E402
from fcn_models.summary import cpu_model  # noqa: E402
from pipelines.core.params import input_norm, load_params  # noqa: E402
from pipelines.data import dataset  # noqa: E402
from pipelines.data.shards import shard_files  # noqa: E402
from pipelines.train import loop, recipe  # noqa: E402


def decoded(params) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every training image, decoded and augmented as epoch 0, normalised: (1x3xHxW, 1xHxW int64)."""
    table = pq.read_table(shard_files(Path(params.data.shards_dir), "train")).to_pydict()
    rows = {k: np.array(table[k], dtype=object) for k in ("id", "image", "label")}
    out = dataset.DecodeAugment(params, True, epoch=0)(rows)
    norm = input_norm(params)
    return [(normalize(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None], norm),
             torch.from_numpy(np.ascontiguousarray(lb))[None].long())
            for im, lb in zip(out["image"], out["label"])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--stage", default="fcn8s")
    parser.add_argument("--iterations", type=int, default=4000)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--no-flush", action="store_true", help="keep subnormals, as the loop did before")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    if args.no_flush:
        subnormals.flush_module_ = lambda module: module
        subnormals.flush_optimizer_ = lambda optimizer: None
    threads = max(1, int(params.ray.cpus_per_worker))
    torch.set_num_threads(threads)
    init = recipe.resolve_init(params, args.stage)
    config = loop.stage_config(params, args.stage, init)
    batches = decoded(params)
    worker = loop.StageWorker(config, torch.device("cpu"))
    worker.model.train()
    load_before = os.getloadavg()
    rates, started, window_start = [], time.perf_counter(), time.perf_counter()
    for step in range(1, args.iterations + 1):
        images, labels = batches[(step - 1) % len(batches)]
        worker.train_step(images, labels)
        if step % args.window == 0:
            now = time.perf_counter()
            rates.append(args.window / (now - window_start))
            print(f"iterations {step - args.window + 1}-{step}: {rates[-1]:.2f} it/s", flush=True)
            window_start = now
    total = time.perf_counter() - started
    load_after = os.getloadavg()
    held = subnormals.count([*worker.net.parameters(),
                             *(v for s in worker.optimizer.state.values() for v in s.values())])

    flush = "without zeroing subnormals (--no-flush)" if args.no_flush else "subnormals zeroed after each step"
    lines = [
        f"Machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; torch {torch.__version__}, {threads} "
        f"torch threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (spinning waits)')}. {args.stage} from {init.note}, "
        f"{config.optimizer} lr {config.lr}, width {config.width}, {len(batches)} whole training "
        f"images (batch 1), {flush}. Load average (1 / 5 min) before {load_before[0]:.2f} / {load_before[1]:.2f}, "
        f"after {load_after[0]:.2f} / {load_after[1]:.2f}.",
        "",
        "| iterations | it/s | vs first window |",
        "|---|---:|---:|",
        *(f"| {i * args.window + 1}-{(i + 1) * args.window} | {r:.2f} | {r / rates[0]:.2f} |"
          for i, r in enumerate(rates)),
        "",
        f"{args.iterations} iterations in {total:.0f} s; last window / first = {rates[-1] / rates[0]:.2f} "
        f"(goal >= 0.9); subnormal weights and optimizer moments at the end: {held}.",
    ]
    publish("## Training speed over a stage (subnormals)", "bench_subnormals" + ("_noflush" if args.no_flush else ""),
            "\n".join(lines), not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
