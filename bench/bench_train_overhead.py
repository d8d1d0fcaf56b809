"""Training step overhead: a stage's loop under Ray Train against the same loop in a plain process.

    .venv/bin/python bench/bench_train_overhead.py [--steps 150] [--warmup 20] [--width 0.125]

Every setting runs the training step a stage runs, pipelines.train.loop's
`StageWorker.train_step` (forward, with autocast and the grad scaler on a GPU,
`segmentation_loss` (mean), backward, step of the reference SGD groups), from the
same starting network (`initial_model`, random init, `freeze_for_stage`), on the
demo profile's kind of data (whole generated VOC-like images, longer side 160, batch 1),
one torch thread each.

  plain              the baseline: this process, batches decoded once and fed from memory
  ray train, memory  a TorchTrainer with one worker (1 CPU), the same decoded batches
                     from memory: the cost of Ray Train itself (its worker process,
                     prepare_model, the session)
  ray train, data    a TorchTrainer with one worker fed by Ray Data as a stage is
                     (build_datasets -> iter_train_batches: decode and flip in a Ray
                     Data actor, ray.data_cpus 1): the whole stage path

Steady state: the steps after `--warmup` steps are timed in the loop itself
(it/s = steps / their seconds). Start-up, reported apart: from the start of the
setting (trainer.fit(), or building the model for plain) to the end of the
first step, Ray's cluster start included for the first Ray setting.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fcn_models.preprocess import normalize  # noqa: E402
from fcn_models.summary import cpu_model  # noqa: E402
from pipelines.train import cluster, loop, recipe  # noqa: E402
from pipelines.core.params import input_norm, parse_params  # noqa: E402
from pipelines.data import dataset  # noqa: E402
from pipelines.data.batches import iter_train_batches  # noqa: E402
from pipelines.data.shards import shard_files  # noqa: E402


def bench_params(shards_dir: Path, width: float):
    return parse_params({
        "data": {"shards_dir": str(shards_dir)},
        "model": {"width": width, "imagenet_weights": None},
        "augment": {"hflip": 0.5},
        "train": {"batch_mode": "whole", "loss": "mean", "momentum": 0.9},
        "ray": {"num_workers": 1, "cpus_per_worker": 1.0, "data_cpus": 1.0},
    }, "bench params")


def make_shards(work: Path, n_train: int) -> Path:
    """Shards of a generated mirror like the demo's (longer side 160), cached in work."""
    from pipelines.data.archives import safe_extract
    from pipelines.data.build_shards import preprocess
    from pipelines.data.synthetic import write_mirror

    shards = work / f"shards-{n_train}"
    if (shards / "train").is_dir():
        return shards
    mirror = write_mirror(work / "mirror", n_train=n_train, n_val=10, seed=0, max_side=160)
    raw = work / "raw"
    for key in ("voc", "sbd"):
        safe_extract(mirror[key], raw)
    preprocess(raw, shards, work / "stats.json", work / "rejected.json")
    shutil.rmtree(raw)
    return shards


def decoded_batches(shards: Path, params) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every training image decoded and flipped as epoch 0 would, as (1x3xHxW float, 1xHxW int64)."""
    table = pq.read_table(shard_files(shards, "train")).to_pydict()
    rows = {k: np.array(table[k], dtype=object) for k in ("id", "image", "label")}
    out = dataset.DecodeAugment(params, True, epoch=0)(rows)
    return [(normalize(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None], input_norm(params)),
             torch.from_numpy(np.ascontiguousarray(lb))[None].long())
            for im, lb in zip(out["image"], out["label"])]


def stage_config(params) -> loop.StageConfig:
    init = recipe.StageInit(source="random", path=None, note="random (benchmark)")
    return dataclasses.replace(loop.stage_config(params, "fcn8s", init), lr=0.01)


def timed_steps(worker: loop.StageWorker, batches, steps: int, warmup: int, started: float) -> dict:
    """The stage's train_step; the clock starts after `warmup` steps."""
    worker.model.train()
    first_step_done = timed_from = None
    for step in range(warmup + steps):
        images, labels = next(batches)
        worker.train_step(images, labels)
        if step == 0:
            first_step_done, first_step_wall = time.perf_counter(), time.time()
        if step == warmup - 1:
            timed_from = time.perf_counter()
    return {"startup_s": first_step_done - started, "first_step_wall": first_step_wall,
            "steps": steps, "seconds": time.perf_counter() - timed_from}


def cycle(batches):
    while True:
        yield from batches


def run_plain(config: loop.StageConfig, batches, steps: int, warmup: int) -> dict:
    torch.set_num_threads(1)
    started = time.perf_counter()
    worker = loop.StageWorker(config, torch.device("cpu"))
    return timed_steps(worker, cycle(batches), steps, warmup, started)


def worker_loop(bench_config: dict) -> None:
    """Runs in the Ray Train worker: the same steps, batches from memory or from the Ray Data shard."""
    import ray.train
    import ray.train.torch

    config: loop.StageConfig = bench_config["stage"]
    worker = loop.StageWorker(config, ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model)
    if bench_config["batches"] is not None:
        train_batches = cycle(bench_config["batches"])
    else:
        train_batches = iter(iter_train_batches(ray.train.get_dataset_shard("train"), config.params))
    result = timed_steps(worker, train_batches, bench_config["steps"], bench_config["warmup"], time.perf_counter())
    # Ray Train keeps reported metrics only with a checkpoint: the worker (on this
    # machine) writes its timings where the driver reads them.
    Path(bench_config["result_file"]).write_text(json.dumps(result))
    ray.train.report({"steps": result["steps"]})


def run_ray(config: loop.StageConfig, params, shards: Path, batches, steps: int, warmup: int, storage: Path) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.time()
    cluster.connect(params.ray)
    result_file = storage / f"result-{int(started * 1000)}.json"
    storage.mkdir(parents=True, exist_ok=True)
    bench_config = {"stage": config, "steps": steps, "warmup": warmup, "batches": batches,
                    "result_file": str(result_file)}
    trainer = TorchTrainer(
        worker_loop, train_loop_config=bench_config, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1.0}),
        run_config=ray.train.RunConfig(name=f"overhead-{int(started * 1000)}", storage_path=str(storage)),
        **({} if batches is not None else {"datasets": dataset.build_datasets(
            params, epochs=dataset.train_epochs(params, dataset.train_rows(params), warmup + steps)),
                                            "dataset_config": dataset.data_config(params)}),
    )
    trainer.fit()
    metrics = json.loads(result_file.read_text())
    # Start-up seen from the driver: from fit() until the worker's first step ended.
    metrics["startup_s"] = metrics["first_step_wall"] - started
    return metrics


def machine() -> str:
    cpu = cpu_model()
    import ray
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores; Ray {ray.__version__}, torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="timed steps per setting (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--width", type=float, default=0.125, help="VGG16 width (default: %(default)s, the demo's)")
    parser.add_argument("--images", type=int, default=100, help="training images (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fcn-bench-train-overhead")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--steps and --warmup must be >= 1")

    args.workdir.mkdir(parents=True, exist_ok=True)
    shards = make_shards(args.workdir, args.images)
    params = bench_params(shards, args.width)
    config = stage_config(params)
    batches = decoded_batches(shards, params)
    load_before = os.getloadavg()
    rows = [("plain", run_plain(config, batches, args.steps, args.warmup))]
    storage = args.workdir / "ray_results"
    rows.append(("ray train, memory", run_ray(config, params, shards, batches, args.steps, args.warmup, storage)))
    rows.append(("ray train, data", run_ray(config, params, shards, None, args.steps, args.warmup, storage)))
    load_after = os.getloadavg()

    base = rows[0][1]["steps"] / rows[0][1]["seconds"]
    print(f"Machine: {machine()}. VGG16 FCN-8s width {args.width}, {len(batches)} whole images "
          f"(longer side 160), batch 1, 1 torch thread; {args.warmup} warm-up steps, {args.steps} timed. "
          f"Load average (1 / 5 min) before {load_before[0]:.1f} / {load_before[1]:.1f}, "
          f"after {load_after[0]:.1f} / {load_after[1]:.1f}.\n")
    print("| setting | iterations | seconds | it/s | ratio vs plain | start-up s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        rate = r["steps"] / r["seconds"]
        print(f"| {name} | {r['steps']} | {r['seconds']:.2f} | {rate:.2f} | {rate / base:.3f} | {r['startup_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
