"""Preprocess stage: the extracted VOC2012 and SBD trees -> Parquet shards.

Splits (as in the FCN paper):
  train = every id of SBD dataset/train.txt (image img/<id>.jpg, label cls/<id>.mat GTcls.Segmentation)
  val   = the ids of pipelines/splits/seg11valid.txt that the VOC2012 segmentation val.txt lists
          (image JPEGImages/<id>.jpg, label SegmentationClass/<id>.png, palette indices)

Every sample is checked (the JPEG fully decodes, the label has the image's size and
only values 0..20 or 255) in a pool of worker processes. Results come back in id
order and go straight into a shard writer, so memory stays flat however large the
dataset is. Output, one row per image:

  data/shards/{train,val}/part-NNNNN.parquet
    id: string, source: string ("sbd" | "voc"), image: binary (the original JPEG bytes),
    label: binary (PNG, mode 'L', class indices 0..20 and 255 = void), height: int32, width: int32

plus data/stats.json (counts, class pixel frequencies, image sizes; a DVC metric) and
data/rejected.json (samples left out with on_bad_sample: skip; [] when none).
The same inputs give byte-identical files.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from pipelines.files import atomic_write_text
from pipelines.params import ParamsError, load_params, resolve

SEG11VALID = Path(__file__).resolve().parent / "splits" / "seg11valid.txt"
NUM_CLASSES = 21
VOID = 255
# zlib level for label PNGs: level 1 writes several times faster than 9 and the label is
# a few KB beside a JPEG of 50-150 KB. Any fixed level gives the same bytes every run.
LABEL_PNG_LEVEL = 1
# Rows are written to Parquet in row groups of about this size, so the writer holds at
# most one row group in memory, not a whole shard.
ROW_GROUP_BYTES = 8 * 1024 * 1024
# Samples per task sent to a worker, and chunks kept in flight per worker.
CHUNK = 8
CHUNKS_IN_FLIGHT_PER_WORKER = 4
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PreprocessError(RuntimeError):
    """Input that cannot be turned into shards; the message says what to fix."""


# --------------------------------------------------------------------------- splits

def voc_root(raw_dir: Path) -> Path:
    return Path(raw_dir) / "VOCdevkit" / "VOC2012"


def sbd_root(raw_dir: Path) -> Path:
    return Path(raw_dir) / "benchmark_RELEASE" / "dataset"


def read_ids(path: Path) -> list[str]:
    """The ids of a split list file, one a line, in file order, without repeats."""
    path = Path(path)
    if not path.is_file():
        raise PreprocessError(f"{path}: split list not found (run `fcn fetch` first, or check data.raw_dir)")
    ids, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        image_id = line.strip()
        if not image_id:
            continue
        # ids become file names: refuse anything that could point outside the dataset
        if not ID_PATTERN.match(image_id):
            raise PreprocessError(f"{path}:{number}: {image_id!r} is not a valid image id")
        if image_id not in seen:
            seen.add(image_id)
            ids.append(image_id)
    return ids


@dataclass(frozen=True)
class Splits:
    train: list[str]
    val: list[str]
    seg11valid_count: int


def split_ids(raw_dir: Path, seg11valid_file: Path = SEG11VALID) -> Splits:
    """train = SBD train.txt; val = seg11valid ids listed in VOC2012 val.txt; both sorted."""
    train_list = sbd_root(raw_dir) / "train.txt"
    voc_val_list = voc_root(raw_dir) / "ImageSets" / "Segmentation" / "val.txt"
    train = sorted(read_ids(train_list))
    voc_val = set(read_ids(voc_val_list))
    seg11valid = read_ids(seg11valid_file)
    val = sorted(i for i in seg11valid if i in voc_val)
    if not train:
        raise PreprocessError(f"{train_list}: lists no ids")
    if not val:
        raise PreprocessError(
            f"none of the {len(seg11valid)} ids of {seg11valid_file} appear in {voc_val_list}: "
            "is data.raw_dir the extracted VOC2012 trainval archive?"
        )
    overlap = sorted(set(train) & set(val))
    if overlap:
        shown = ", ".join(overlap[:5]) + (", ..." if len(overlap) > 5 else "")
        raise PreprocessError(
            f"{len(overlap)} ids are both in SBD train ({train_list}) and in val "
            f"({seg11valid_file} and {voc_val_list}): {shown}; train and val must not overlap"
        )
    return Splits(train=train, val=val, seg11valid_count=len(seg11valid))


@dataclass(frozen=True)
class Sample:
    id: str
    source: str  # "sbd" or "voc"
    image_path: str
    label_path: str


def split_samples(raw_dir: Path, splits: Splits) -> dict[str, list[Sample]]:
    sbd, voc = sbd_root(raw_dir), voc_root(raw_dir)
    return {
        "train": [Sample(i, "sbd", str(sbd / "img" / f"{i}.jpg"), str(sbd / "cls" / f"{i}.mat"))
                  for i in splits.train],
        "val": [Sample(i, "voc", str(voc / "JPEGImages" / f"{i}.jpg"),
                       str(voc / "SegmentationClass" / f"{i}.png"))
                for i in splits.val],
    }


# --------------------------------------------------------------------------- one sample

class BadSample(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise BadSample(path, f"missing {what} file") from None
    except OSError as err:
        raise BadSample(path, f"cannot read {what} file: {err}") from None


def _decode_image(path: str) -> tuple[bytes, int, int]:
    """The JPEG's bytes and (height, width), after decoding every pixel."""
    data = _read_bytes(path, "image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                raise BadSample(path, f"image is {image.format or 'unknown format'}, expected JPEG")
            image.load()  # a full decode: a truncated or corrupt file fails here, not downstream
            width, height = image.size
    except BadSample:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise BadSample(path, f"image does not decode: {err}") from None
    return data, height, width


def _read_label(path: str, source: str) -> np.ndarray:
    data = _read_bytes(path, "label")
    if source == "sbd":
        try:
            # The default record layout reads faster than squeeze_me/struct_as_record=False.
            # Skipping the integrity pre-pass saves a second decompression; a corrupt stream
            # still fails its zlib check while being read.
            mat = scipy.io.loadmat(io.BytesIO(data), variable_names=["GTcls"],
                                   verify_compressed_data_integrity=False)
            label = np.asarray(mat["GTcls"][0, 0]["Segmentation"])
        except Exception as err:
            raise BadSample(path, f"label .mat has no readable GTcls.Segmentation: {err!r}") from None
    else:
        try:
            with Image.open(io.BytesIO(data)) as image:
                # palette indices are the class ids; converting to RGB would lose them
                if image.mode not in ("P", "L"):
                    raise BadSample(path, f"label PNG has mode {image.mode}, expected a palette ('P') image")
                label = np.asarray(image)
        except BadSample:
            raise
        except Exception as err:
            raise BadSample(path, f"label does not decode: {err}") from None
    if label.ndim != 2:
        raise BadSample(path, f"label has shape {label.shape}, expected a 2-d class map")
    return label


def _check_values(label: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray]:
    """The label as uint8 and its per-value pixel counts (256 bins)."""
    if label.dtype != np.uint8:
        if not np.issubdtype(label.dtype, np.integer):
            raise BadSample(path, f"label has dtype {label.dtype}, expected integer class ids")
        low, high = int(label.min()), int(label.max())
        if low < 0 or high > 255:
            raise BadSample(path, f"label values outside 0..{NUM_CLASSES - 1} and {VOID}: min {low}, max {high}")
        label = label.astype(np.uint8)
    counts = np.bincount(label.ravel(), minlength=256)
    bad = np.flatnonzero(counts[NUM_CLASSES:VOID]) + NUM_CLASSES
    if bad.size:
        shown = ", ".join(f"{v} ({counts[v]} px)" for v in bad[:5])
        raise BadSample(path, f"label values outside 0..{NUM_CLASSES - 1} and {VOID}: {shown}")
    return label, counts


def _encode_label(label: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label)).save(buffer, format="PNG", compress_level=LABEL_PNG_LEVEL)
    return buffer.getvalue()


def load_sample(sample: Sample) -> tuple[dict | None, np.ndarray | None, dict | None]:
    """(row, class pixel counts, None) for a good sample, (None, None, problem) for a bad one."""
    try:
        image, height, width = _decode_image(sample.image_path)
        label = _read_label(sample.label_path, sample.source)
        if label.shape != (height, width):
            raise BadSample(sample.label_path, f"label is {label.shape[1]}x{label.shape[0]} (WxH) "
                                               f"but the image is {width}x{height}")
        label, counts = _check_values(label, sample.label_path)
    except BadSample as bad:
        return None, None, {"id": sample.id, "file": bad.path, "reason": bad.reason}
    row = {"id": sample.id, "source": sample.source, "image": image, "label": _encode_label(label),
           "height": height, "width": width}
    return row, counts, None


def _load_chunk(samples: list[Sample]) -> list:
    return [load_sample(s) for s in samples]


def load_in_order(samples: list[Sample], pool, workers: int = 1) -> Iterator[tuple]:
    """load_sample over samples, in order, on the pool (or here when pool is None).

    A bounded window of chunks is kept in flight instead of Pool.imap: imap queues the
    whole task list up front and buffers finished results without limit whenever the
    writer falls behind, so its memory would grow with the dataset.
    """
    if pool is None:
        yield from map(load_sample, samples)
        return
    window = CHUNKS_IN_FLIGHT_PER_WORKER * workers
    pending = deque()
    for start in range(0, len(samples), CHUNK):
        pending.append(pool.apply_async(_load_chunk, (samples[start:start + CHUNK],)))
        if len(pending) >= window:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


# --------------------------------------------------------------------------- shards

def _arrow():
    # pyarrow is only needed by the writing process, not by the pool workers
    import pyarrow as pa
    import pyarrow.parquet as pq
    return pa, pq


def shard_schema():
    pa, _ = _arrow()
    return pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("image", pa.binary()), ("label", pa.binary()),
        ("height", pa.int32()), ("width", pa.int32()),
    ])


def _row_bytes(row: dict) -> int:
    return len(row["image"]) + len(row["label"]) + len(row["id"]) + len(row["source"]) + 8


class ShardWriter:
    """Writes rows into part-NNNNN.parquet files of at most max_bytes of row data each.

    A shard is closed before a row that would take it past max_bytes, so a shard is
    larger than the bound only by Parquet's own headers and footer, or when one row alone
    exceeds it.
    The layout (row groups, pages, metadata) depends only on the rows, so the same rows
    give byte-identical files.
    """

    def __init__(self, out_dir: Path, max_bytes: int, row_group_bytes: int = ROW_GROUP_BYTES):
        self.out_dir, self.max_bytes = Path(out_dir), max_bytes
        self.row_group_bytes = min(row_group_bytes, max_bytes)
        self.paths: list[Path] = []
        self._writer = None
        self._rows: list[dict] = []
        self._buffered = 0
        self._shard_bytes = 0

    def add(self, row: dict) -> None:
        size = _row_bytes(row)
        if self._shard_bytes and self._shard_bytes + size > self.max_bytes:
            self._close_shard()
        self._rows.append(row)
        self._buffered += size
        self._shard_bytes += size
        if self._buffered >= self.row_group_bytes:
            self._write_row_group()

    def close(self) -> list[Path]:
        self._close_shard()
        return self.paths

    def _write_row_group(self) -> None:
        if not self._rows:
            return
        pa, pq = _arrow()
        schema = shard_schema()
        if self._writer is None:
            path = self.out_dir / f"part-{len(self.paths):05d}.parquet"
            self.paths.append(path)
            self._writer = pq.ParquetWriter(
                path, schema,
                compression="none",  # JPEG and PNG bytes are compressed already
                use_dictionary=["source"],
                write_statistics=["id", "source", "height", "width"],
            )
        columns = {name: [row[name] for row in self._rows] for name in schema.names}
        self._writer.write_table(pa.table(columns, schema=schema), row_group_size=len(self._rows))
        self._rows, self._buffered = [], 0

    def _close_shard(self) -> None:
        self._write_row_group()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._shard_bytes = 0


# --------------------------------------------------------------------------- the stage

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


def class_names() -> list[str]:
    # find_spec locates the package without running its __init__, which imports torch
    # (half a gigabyte of memory this stage has no use for)
    package = importlib.util.find_spec("fcn_models")
    names = (Path(package.origin).parent / "voc_classes.txt").read_text().split()
    if len(names) != NUM_CLASSES:
        raise PreprocessError(f"{package.origin}: voc_classes.txt lists {len(names)} classes, expected {NUM_CLASSES}")
    return names


def _write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def _remove_leftovers(shards_dir: Path) -> None:
    """Temp dirs of a run that was killed before it could clean up."""
    for split in ("train", "val"):
        for stale in shards_dir.glob(f".{split}.*"):
            if stale.is_dir():
                print(f"removing leftover {stale}", flush=True)
                shutil.rmtree(stale)


def _swap_into_place(tmp_dir: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp_dir, target)
    if old is not None:
        shutil.rmtree(old)


# What the fork server imports once, so that each worker it forks starts with them loaded.
# Not this module itself: under `python -m pipelines.preprocess` every worker runs it
# afresh as its main module, and runpy warns when it is already imported.
WORKER_PRELOAD = ["numpy", "scipy.io", "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "yaml"]


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
               seg11valid_file: Path = SEG11VALID, progress_every: int = 1000) -> dict:
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
            _swap_into_place(tmp_dir, shards_dir / split)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml",
                        help="params file; relative data paths are taken from its directory (default: %(default)s)")
    parser.add_argument("--progress-every", type=int, default=1000, metavar="N",
                        help="print a progress line every N images (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        data = load_params(args.params).data
    except ParamsError as err:
        print(f"preprocess: {err}", file=sys.stderr)
        return 2
    root = Path(args.params).resolve().parent
    try:
        preprocess(
            resolve(data.raw_dir, root), resolve(data.shards_dir, root),
            resolve(data.stats_file, root), resolve(data.rejected_file, root),
            shard_max_bytes=data.shard_max_bytes, on_bad_sample=data.on_bad_sample,
            workers=data.workers, progress_every=max(args.progress_every, 1),
        )
    except PreprocessError as err:
        print(f"preprocess: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
