"""Data pipeline throughput: Parquet shards -> Ray Data -> torch batches, against a torch DataLoader at its best.

    .venv/bin/python bench/bench_data.py             # prints the table, updates docs/BENCHMARKS.md
    .venv/bin/python bench/bench_data.py --no-write  # prints only

Both sides do the same work per image: decode the JPEG and PNG label, the full
training augmentation of pipelines/data/dataset.py (random rescale, pad, 512 x 512 random
crop, flip; the same albumentations pipeline and per-sample seeds), batches of
uint8 crops, then normalisation to float32 N x 3 x H x W in the consuming process.

  ray         build_datasets(epochs=E) -> iter_train_batches, as a training worker
              consumes it: one execution of the train dataset holds the E epochs
              (decode actors started once); ray.data_cpus = workers, so `workers`
              decode actors.
  dataloader  the baseline, at its best: a map-style torch Dataset reading the same
              JPEG/PNG bytes from files in a directory; one DataLoader for all E epochs
              with num_workers=workers and persistent_workers=True (workers forked once a
              run, as Ray's actors start once), prefetch_factor batches queued per worker,
              and a sampler reshuffling each epoch (set_epoch) whose keys carry the epoch,
              so persistent workers augment each sample for its own epoch.
              pin_memory only where CUDA is available (the batches then go to the GPU
              with non_blocking copies): pinning helps host-to-GPU copies only, and on a
              CPU-only machine it would just add a copy.

The images are VOC-like (a generated mirror, longer side 500, through
pipelines.data.build_shards). A run is E epochs from the start. Two rates are reported
for each side, each the best of --repeat rounds: the whole run, start-up included (Ray
starts its actors, the DataLoader forks its workers), and the rate after the first
batch. The rounds interleave the two sides, the side that goes first alternating; the
load average is quoted from before and after.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdoc import DOC, write_section  # noqa: E402

from fcn_models.preprocess import normalize  # noqa: E402
from fcn_models.summary import cpu_model  # noqa: E402
from pipelines.core.params import input_norm, parse_params  # noqa: E402
from pipelines.data.batches import iter_train_batches  # noqa: E402
from pipelines.data.dataset import DecodeAugment, build_datasets  # noqa: E402
from pipelines.data.shards import shard_files  # noqa: E402

SECTION = "## Data pipeline (bench/bench_data.py)"
BENCH_NAME = "bench_data"  # its markers in docs/BENCHMARKS.md
GOAL_PER_CORE = 25.0
GOAL_WHOLE, GOAL_AFTER_FIRST = 1.0, 1.3  # ray vs the DataLoader
PREFETCH_FACTOR = 4  # batches queued per worker (default 2): slack for images whose random scale makes them slow


def bench_params(shards_dir: Path, workers: int, batch_size: int):
    return parse_params({
        "data": {"shards_dir": str(shards_dir)},
        "model": {"input_norm": "torchvision-rgb"},
        "augment": {"scale_min": 0.5, "scale_max": 2.0, "crop_size": 512, "hflip": 0.5},
        "train": {"seed": 0, "batch_mode": "crops", "batch_size": batch_size},
        "ray": {"num_workers": 1, "cpus_per_worker": 1.0, "data_cpus": float(workers)},
    }, "bench params")


# --------------------------------------------------------------------------- data

def make_shards(work: Path, n_images: int) -> Path:
    """A generated VOC-like mirror of n_images training images, preprocessed into shards (cached in work)."""
    from pipelines.data.archives import safe_extract
    from pipelines.data.build_shards import preprocess
    from pipelines.data.synthetic import write_mirror

    shards = work / f"shards-{n_images}"
    if (shards / "train").is_dir():
        return shards
    mirror = write_mirror(work / f"mirror-{n_images}", n_train=n_images, n_val=10, seed=0, max_side=500)
    raw = work / f"raw-{n_images}"
    for key in ("voc", "sbd"):
        safe_extract(mirror[key], raw)
    preprocess(raw, shards, work / f"stats-{n_images}.json", work / f"rejected-{n_images}.json")
    return shards


def export_files(shards: Path) -> Path:
    """The train shards' JPEG and PNG bytes as files, <id>.jpg and <id>.png, for the baseline."""
    out = shards.parent / (shards.name + "-files")
    if out.is_dir():
        return out
    tmp = shards.parent / (shards.name + "-files.tmp")
    tmp.mkdir(exist_ok=True)
    for part in shard_files(shards, "train"):
        table = pq.read_table(part, columns=["id", "image", "label"])
        for sample_id, image, label in zip(*(table[c].to_pylist() for c in ("id", "image", "label"))):
            (tmp / f"{sample_id}.jpg").write_bytes(image)
            (tmp / f"{sample_id}.png").write_bytes(label)
    os.replace(tmp, out)
    return out


class FileDataset(torch.utils.data.Dataset):
    """The baseline: one sample per JPEG/PNG pair in a directory, same decode and augmentation.
    Keyed by (epoch, index), so that persistent workers augment each sample for its epoch."""

    def __init__(self, files: Path, params):
        self.files = files
        self.ids = sorted(p.stem for p in files.glob("*.jpg"))
        self.transform = DecodeAugment(params, augment=True)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, key):
        epoch, index = key
        sample_id = self.ids[index]
        row = {"id": np.array([sample_id], dtype=object), "epoch": np.array([epoch]),
               "image": np.array([(self.files / f"{sample_id}.jpg").read_bytes()], dtype=object),
               "label": np.array([(self.files / f"{sample_id}.png").read_bytes()], dtype=object)}
        out = self.transform(row)
        return torch.from_numpy(out["image"][0]), torch.from_numpy(out["label"][0])


class EpochSampler(torch.utils.data.Sampler):
    """shuffle=True's order, seeded by the epoch; keys (epoch, index). The sampler runs in the
    consuming process, so set_epoch reaches persistent workers through the keys."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist()
        return ((self.epoch, i) for i in order)


# --------------------------------------------------------------------------- runs

def time_run(batches) -> tuple[int, float, float, int]:
    """(images, seconds, seconds to the first batch, images in it) of one run over all its epochs."""
    images, first, start = 0, None, time.perf_counter()
    for batch, _ in batches:
        if first is None:
            first = (time.perf_counter() - start, batch.shape[0])
        images += batch.shape[0]
    return images, time.perf_counter() - start, *first


def run_ray(shards: Path, workers: int, batch_size: int, epochs: int):
    params = bench_params(shards, workers, batch_size)
    train = build_datasets(params, epochs=epochs)["train"]
    return time_run(iter_train_batches(train.iterator(), params))


def run_dataloader(files: Path, shards: Path, workers: int, batch_size: int, epochs: int, prefetch: int):
    params = bench_params(shards, workers, batch_size)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    kept = []

    def batches():
        dataset = FileDataset(files, params)
        sampler = EpochSampler(len(dataset))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
            persistent_workers=True, prefetch_factor=prefetch, pin_memory=cuda)
        kept.append(loader)  # its workers shut down after the timed run, not inside it
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                yield normalize(images.permute(0, 3, 1, 2), input_norm(params)), labels.to(device).long()

    timed = time_run(batches())
    kept.clear()
    return timed


def best(timed: list[tuple]) -> tuple[float, float, float, int]:
    """(whole-run images/s, first batch s, images/s after it, images) over rounds: each the best."""
    return (max(t[0] / t[1] for t in timed), min(t[2] for t in timed), max(steady_rate(*t) for t in timed),
            timed[0][0])


def steady_rate(images: int, seconds: float, first: float, first_images: int) -> float:
    # Images/s once the first batch is out: a run's start-up (for Ray: decode actors
    # importing torch and albumentations) is a fixed cost per training run.
    return (images - first_images) / max(seconds - first, 1e-9)


# --------------------------------------------------------------------------- report

def machine() -> str:
    cpu = cpu_model()
    import albumentations
    import cv2
    import ray
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores; Ray {ray.__version__}, torch {torch.__version__}, "
            f"albumentations {albumentations.__version__}, OpenCV {cv2.__version__}")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} / {five:.1f}"


def format_report(results: dict, args, loads) -> str:
    cuda = torch.cuda.is_available()
    lines = [
        f"Machine: {machine()}.",
        f"{args.images} VOC-like training images (longer side 500), batches of {args.batch_size} 512 x 512 "
        f"crops, random scale 0.5-2.0, pad, crop, flip, normalise; a run is {args.epochs} epochs from the start. "
        f"DataLoader: one for the run, persistent workers, prefetch_factor {args.prefetch_factor}, pin_memory "
        f"{'on (CUDA)' if cuda else 'off (no CUDA: pinning only helps copies to a GPU)'}. "
        f"Each figure is the best of {args.repeat} rounds, the sides interleaved. "
        f"Load average (1 / 5 min) before and after: {loads[0]}, {loads[1]}.",
        "",
        "| pipeline | workers | images | whole run: images/s | whole run: ratio | first batch s "
        "| after it: images/s | after it: ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ray_rows = []
    for workers in args.workers:
        base = best(results[("dataloader", workers)])
        for name in ("ray", "dataloader"):
            rate, first, steady, images = best(results[(name, workers)])
            lines.append(f"| {name} | {workers} | {images} | {rate:.1f} | {rate / base[0]:.2f} | {first:.2f} | "
                         f"{steady:.1f} | {steady / base[2]:.2f} |")
            if name == "ray":
                ray_rows.append((workers, rate / workers, rate / base[0], steady / base[2]))

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"
    per_core = min(r[1] for r in ray_rows)
    whole = ", ".join(f"{r[2]:.2f} with {r[0]}" for r in ray_rows)
    after = ", ".join(f"{r[3]:.2f} with {r[0]}" for r in ray_rows)
    lines += ["", f"Goals for ray against the DataLoader: whole run (start-up included) at least {GOAL_WHOLE:g}x: "
                  f"{verdict(all(r[2] >= GOAL_WHOLE for r in ray_rows))} ({whole} workers); after the first batch "
                  f"at least {GOAL_AFTER_FIRST:g}x: {verdict(all(r[3] >= GOAL_AFTER_FIRST for r in ray_rows))} "
                  f"({after} workers); {GOAL_PER_CORE:g} images/s per decode worker: "
                  f"{verdict(per_core >= GOAL_PER_CORE)} (lowest {per_core:.1f})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400, help="training images (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs a run (default: %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="decode processes on each side (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="rounds (at least 3 for the doc); the best counts")
    parser.add_argument("--prefetch-factor", type=int, default=PREFETCH_FACTOR,
                        help="the DataLoader's batches queued per worker (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fcn-bench-data"),
                        help="generated images and shards are kept here (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)

    import ray
    from ray.data import DataContext

    from pipelines.train.cluster import bind_loopback

    args.workdir.mkdir(parents=True, exist_ok=True)
    shards = make_shards(args.workdir, args.images)
    files = export_files(shards)
    bind_loopback()  # the local cluster listens on 127.0.0.1 only
    ray.init(address="local", num_cpus=max(max(args.workers), os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    loads = [load()]
    results = {}
    sides = {"dataloader": lambda w: run_dataloader(files, shards, w, args.batch_size, args.epochs,
                                                    args.prefetch_factor),
             "ray": lambda w: run_ray(shards, w, args.batch_size, args.epochs)}
    for round_ in range(args.repeat):
        # Interleaved, the side going first alternating, so load from elsewhere hits both alike.
        for workers in args.workers:
            for name in (("dataloader", "ray") if round_ % 2 == 0 else ("ray", "dataloader")):
                results.setdefault((name, workers), []).append(sides[name](workers))
                images, seconds, first, _ = results[(name, workers)][-1]
                print(f"round {round_ + 1}: {name}, {workers} workers: {images / seconds:.1f} images/s, "
                      f"first batch {first:.2f} s", flush=True)
    loads.append(load())
    ray.shutdown()

    report = format_report(results, args, loads)
    print(report)
    if not args.no_write:
        write_section(SECTION, BENCH_NAME, report)
        print(f"\nwritten to {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
