"""The raw VOC2012 and SBD trees -> both splits' Parquet shards, their stats and the rejected list.

    preprocess(raw_dir, shards_dir, stats_file, rejected_file, ...)   -> the stats written

Splits as in the FCN paper (pipelines/data/rawdata.py): train = SBD train.txt, val =
seg11valid. Every sample is checked in a pool of worker processes; results come back
in id order and go straight into a shard writer (pipelines/data/shards.py, the contract),
so memory stays flat however large the dataset is. Output:

  data/shards/{train,val}/part-NNNNN.parquet   the shard contract's rows
  data/stats.json      counts, class pixel frequencies, image sizes (a DVC metric)
  data/rejected.json   samples left out with on_bad_sample: skip ([] when none)

The same inputs give byte-identical files. Both splits are written into temp dirs
beside their targets and moved into place only when both are complete; a run killed
before that leaves temp dirs that the next run removes first.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np

from fcn_models.voc import NUM_CLASSES, VOID, class_names
from pipelines.core.files import atomic_write_text, replace_dir
from pipelines.data.rawdata import (
    Sample,
    load_in_order,
    sbd_root,
    split_ids,
    split_samples,
)
from pipelines.data.shards import SEG11VALID_FILE, SPLITS, ShardError, ShardWriter


class PreprocessError(ShardError):
    """Input that cannot be turned into shards; the message says what to fix."""


class SplitStats:
    """Counts a split's images, sizes and class pixels as rows go by."""

    def __init__(self, listed: int):
        self.listed = listed
        self.images = 0
        self.counts = np.zeros(256, dtype=np.int64)
        self.min_hw = [None, None]
        self.max_hw = [None, None]

    def add(self, row: dict, counts: np.ndarray) -> None:
        self.images += 1
        self.counts += counts
        for k, value in enumerate((row["height"], row["width"])):
            self.min_hw[k] = value if self.min_hw[k] is None else min(self.min_hw[k], value)
            self.max_hw[k] = value if self.max_hw[k] is None else max(self.max_hw[k], value)

    def summary(self, rejected: int, shard_paths: list[Path]) -> dict:
        class_pixels = self.counts[:NUM_CLASSES]
        labelled = int(class_pixels.sum())
        total = labelled + int(self.counts[VOID])
        names = class_names()
        return {
            "listed": self.listed,
            "images": self.images,
            "rejected": rejected,
            "shards": len(shard_paths),
            "shard_bytes": sum(p.stat().st_size for p in shard_paths),
            "height": {"min": self.min_hw[0], "max": self.max_hw[0]},
            "width": {"min": self.min_hw[1], "max": self.max_hw[1]},
            "pixels": total,
            "void_pixels": int(self.counts[VOID]),
            "void_fraction": round(float(self.counts[VOID] / total), 6) if total else 0.0,
            "class_pixels": {n: int(c) for n, c in zip(names, class_pixels)},
            # fractions of the non-void pixels
            "class_frequency": {n: round(int(c) / labelled, 6) if labelled else 0.0
                                for n, c in zip(names, class_pixels)},
        }


def _write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def _remove_leftovers(shards_dir: Path) -> None:
    """Temp dirs of a run that was killed before it could clean up."""
    for split in SPLITS:
        for stale in shards_dir.glob(f".{split}.*"):
            if stale.is_dir():
                print(f"removing leftover {stale}", flush=True)
                shutil.rmtree(stale)


# What the fork server imports once, so that each worker it forks starts with them loaded.
# Not the stage's module: under `python -m pipelines.stages.preprocess` every worker runs it
# afresh as its main module, and runpy warns when it is already imported.
WORKER_PRELOAD = ["numpy", "scipy.io", "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "yaml",
                  "pipelines.data.rawdata"]


def _start_pool(workers: int):
    # forkserver, not fork: the parent may already run pyarrow's threads, and forking a
    # threaded process can deadlock. Unlike spawn, the heavy imports happen once.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context.Pool(workers)


def worker_count(workers: int) -> int:
    if workers > 0:
        return workers
    # the cores this process may run on, not all cores of the host
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write_split(split: str, samples: list[Sample], out_dir: Path, *, raw_dir: Path, pool, workers: int,
                 shard_max_bytes: int, on_bad_sample: str, progress_every: int,
                 listed: int) -> tuple[dict, list[dict]]:
    writer = ShardWriter(out_dir, shard_max_bytes)
    stats, rejected = SplitStats(listed), []
    started = time.perf_counter()
    for done, (sample, (row, counts, problem)) in enumerate(zip(samples, load_in_order(samples, pool, workers)), 1):
        if problem is not None:
            if on_bad_sample == "error":
                raise PreprocessError(
                    f"{split} sample {problem['id']}: {problem['file']}: {problem['reason']}. "
                    "Replace or remove the file, or set data.on_bad_sample: skip to leave the sample out."
                )
            print(f"skipping {split} sample {problem['id']}: {problem['file']}: {problem['reason']}", flush=True)
            file = Path(problem["file"])
            rejected.append({"split": split, "id": problem["id"],
                             "file": str(file.relative_to(raw_dir)) if file.is_relative_to(raw_dir) else str(file),
                             "reason": problem["reason"]})
        else:
            writer.add(row)
            stats.add(row, counts)
        if done % progress_every == 0 or done == len(samples):
            rate = done / max(time.perf_counter() - started, 1e-9)
            print(f"{split}: {done}/{len(samples)} images ({rate:.0f} images/s)", flush=True)
    if stats.images == 0:
        raise PreprocessError(f"{split}: every sample was rejected; nothing to write")
    paths = writer.close()
    return stats.summary(len(rejected), paths), rejected


def preprocess(raw_dir: Path, shards_dir: Path, stats_file: Path, rejected_file: Path, *,
               shard_max_bytes: int = 64 * 1024 * 1024, on_bad_sample: str = "error", workers: int = 0,
               seg11valid_file: Path = SEG11VALID_FILE, progress_every: int = 1000) -> dict:
    """Validate every sample of both splits and write shards, stats and the rejected list.

    Both splits are written into temp dirs beside data/shards/<split> and moved into
    place only when both are complete, so a failed run leaves the old shards as they were.
    Returns the stats written to stats_file.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    raw_dir, shards_dir = Path(raw_dir).resolve(), Path(shards_dir)
    splits = split_ids(raw_dir, seg11valid_file)
    print(f"train: {len(splits.train)} ids from {sbd_root(raw_dir) / 'train.txt'}", flush=True)
    print(f"val: {len(splits.val)} of {splits.seg11valid_count} seg11valid ids", flush=True)
    samples = split_samples(raw_dir, splits)

    shards_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(shards_dir)
    workers = worker_count(workers)
    pool = _start_pool(workers) if workers > 1 else None
    tmp_dirs: dict[str, Path] = {}
    stats: dict = {}
    rejected: list[dict] = []
    try:
        for split in ("train", "val"):
            # os.mkdir, not mkdtemp: the split dir gets the usual permissions, not mkdtemp's 0700
            tmp_dirs[split] = shards_dir / f".{split}.tmp-{os.getpid()}"
            os.mkdir(tmp_dirs[split])
            listed = len(splits.train) if split == "train" else splits.seg11valid_count
            stats[split], split_rejected = _write_split(
                split, samples[split], tmp_dirs[split], raw_dir=raw_dir, pool=pool, workers=workers,
                shard_max_bytes=shard_max_bytes, on_bad_sample=on_bad_sample,
                progress_every=progress_every, listed=listed,
            )
            rejected += split_rejected
        for split, tmp_dir in tmp_dirs.items():
            replace_dir(tmp_dir, shards_dir / split)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for tmp_dir in tmp_dirs.values():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    _write_json(Path(rejected_file), rejected)
    _write_json(Path(stats_file), stats)
    for split in ("train", "val"):
        s = stats[split]
        print(f"{split}: {s['images']} images, {s['rejected']} rejected, {s['shards']} shards "
              f"({s['shard_bytes'] / 2**20:.1f} MiB), void fraction {s['void_fraction']:.4f}", flush=True)
    return stats
