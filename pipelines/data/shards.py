"""The shard contract: which images make each split, how a shard stores them, how they are read.

    data/shards/{train,val}/part-NNNNN.parquet, one row per image:
        id      string   e.g. 2008_000123
        source  string   "sbd" (train) or "voc" (val)
        image   binary   the original JPEG bytes, not re-encoded
        label   binary   PNG, one channel: class ids 0..20, 255 = void (fcn_models.voc)
        height, width    int32

Splits: train = SBD's train.txt; val = the paper's seg11valid ids (SEG11VALID_FILE)
that VOC2012's segmentation val list holds. Everything that writes, lists or reads
shards goes through here: the preprocess stage writes them with ShardWriter;
training (inside Ray Data), evaluation, tracking and registration list them with
`shard_files` and decode a row with `decode_sample`, so a sample is the same pixels
wherever it is used.
`file_digests` hashes a shard's bytes in one read for all that a training stage's
start takes of them (its run name's sha1, DVC's md5 of the shards and of each split).

No Ray, no torch: pyarrow and OpenCV are imported where they are used, so the
preprocess stage's pool workers (which import this module for the id lists) pay
for neither.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from fcn_models.errors import FCNError

SPLITS = ("train", "val")
# Column names and types, in file order.
COLUMNS = (("id", "string"), ("source", "string"), ("image", "binary"), ("label", "binary"),
           ("height", "int32"), ("width", "int32"))
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)
# What training, evaluation and the logged examples read of a row.
SAMPLE_COLUMNS = ("id", "image", "label")
FILE_PATTERN = "part-*.parquet"
SEG11VALID_FILE = Path(__file__).resolve().parent / "splits" / "seg11valid.txt"
# Ids become file names: anything that could point outside a dataset is refused.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
REMAKE = "re-run `fcn preprocess` (or `dvc repro preprocess`)"


class ShardError(FCNError, ValueError):
    """Shards or split lists that break the contract; the message names the file and the fix."""


# --------------------------------------------------------------------------- splits

def read_id_list(path: Path) -> list[str]:
    """The ids of a split list file, one a line, in file order, without repeats."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: split list not found (run `fcn fetch` first, or check data.raw_dir)")
    ids, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        image_id = line.strip()
        if not image_id:
            continue
        if not ID_PATTERN.match(image_id):
            raise ShardError(f"{path}:{number}: {image_id!r} is not a valid image id")
        if image_id not in seen:
            seen.add(image_id)
            ids.append(image_id)
    return ids


def seg11valid_ids() -> list[str]:
    """The 736 ids of the FCN paper's validation set (VOC2011 seg val minus SBD train), in file order."""
    ids = read_id_list(SEG11VALID_FILE)
    if not ids:
        raise ShardError(f"{SEG11VALID_FILE}: no ids found (expected one VOC id per line)")
    return ids


# --------------------------------------------------------------------------- listing and reading

def schema():
    """The pyarrow schema of a shard."""
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS])


def shard_path(split_dir: Path, index: int) -> Path:
    return Path(split_dir) / f"part-{index:05d}.parquet"


def shard_files(shards_dir: Path, split: str) -> list[Path]:
    """The Parquet shards of one split, checked to exist. Only files of the contract's
    pattern count: a temp folder a killed preprocess left beside them does not."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    split_dir = Path(shards_dir) / split
    files = sorted(p for p in split_dir.glob(FILE_PATTERN) if p.is_file())
    if not files:
        raise ShardError(f"{split_dir}: no {FILE_PATTERN} shards; {REMAKE}, or check data.shards_dir")
    return files


@dataclasses.dataclass(frozen=True)
class FileDigest:
    """One shard file's bytes, hashed in one read: md5 (what DVC records for the file) and
    sha1 (what a training run's name is fingerprinted with)."""
    path: Path
    size: int
    md5: str
    sha1: bytes


# (resolved path, inode, size, mtime_ns) -> FileDigest: a training stage's start needs the
# shards' hashes in three places, and the shards are the largest thing it reads.
_DIGESTS: dict[tuple, FileDigest] = {}
# A file changed this recently may change again without its mtime moving (the clock's
# tick is coarse), so its digest is not kept (git's "racy" files).
RACY_NS = 2_000_000_000


def file_digests(files: Sequence[Path]) -> list[FileDigest]:
    """md5 and sha1 of each file, in the order given; each file is read once per process
    while its inode, size and mtime stay the same."""
    out = []
    for path in map(Path, files):
        stat = path.stat()
        key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        digest = _DIGESTS.get(key)
        if digest is None:
            md5, sha1 = hashlib.md5(), hashlib.sha1()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    md5.update(chunk)
                    sha1.update(chunk)
            digest = FileDigest(path, stat.st_size, md5.hexdigest(), sha1.digest())
            if time.time_ns() - stat.st_mtime_ns > RACY_NS:
                _DIGESTS[key] = digest
        out.append(digest if digest.path == path else dataclasses.replace(digest, path=path))
    return out


def open_shard(path: Path, columns: Sequence[str] = SAMPLE_COLUMNS):
    """A pyarrow ParquetFile, checked to be readable and to hold `columns`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        shard = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"{path}: not a readable Parquet shard ({err}); {REMAKE}") from None
    missing = [c for c in columns if c not in shard.schema_arrow.names]
    if missing:
        raise ShardError(f"{path}: shard lacks column {', '.join(missing)} (a shard has "
                         f"{', '.join(COLUMN_NAMES)}); {REMAKE}")
    return shard


def count_rows(files: Sequence[Path]) -> int:
    """Rows in all the shards, from their Parquet footers."""
    return sum(open_shard(path, ()).metadata.num_rows for path in files)


def iter_rows(files: Sequence[Path], columns: Sequence[str] = SAMPLE_COLUMNS,
              limit: int | None = None) -> Iterator[tuple[Path, tuple]]:
    """(shard path, row values in `columns` order) for every row, one row group in memory at a time."""
    import pyarrow as pa

    seen = 0
    for path in files:
        shard = open_shard(path, columns)
        for group in range(shard.num_row_groups):
            try:
                table = shard.read_row_group(group, columns=list(columns))
            except (pa.ArrowException, OSError) as err:
                raise ShardError(f"{path}: row group {group} cannot be read ({err}); {REMAKE}") from None
            for row in zip(*(table.column(name).to_pylist() for name in columns)):
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield path, row


# --------------------------------------------------------------------------- decoding a row

def decode_sample(sample_id: str, image_bytes: bytes, label_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """JPEG and PNG bytes of one shard row -> (H x W x 3 uint8 RGB image, H x W uint8 label)."""
    import cv2

    image = cv2.imdecode(np.frombuffer(image_bytes or b"", np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ShardError(f"sample {sample_id}: image bytes are not a decodable JPEG ({REMAKE})")
    label = cv2.imdecode(np.frombuffer(label_bytes or b"", np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2 or label.dtype != np.uint8:
        raise ShardError(f"sample {sample_id}: label is not a single-channel 8-bit PNG ({REMAKE})")
    if label.shape != image.shape[:2]:
        raise ShardError(f"sample {sample_id}: label {label.shape} and image {image.shape[:2]} differ in size "
                         f"({REMAKE})")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), label


def iter_samples(files: Sequence[Path], limit: int | None = None) -> Iterator[tuple[Path, str, np.ndarray, np.ndarray]]:
    """(shard, id, RGB image, label) for every row of the shards, decoded; errors name the shard."""
    for path, (sample_id, image_bytes, label_bytes) in iter_rows(files, SAMPLE_COLUMNS, limit):
        try:
            image, label = decode_sample(str(sample_id), image_bytes, label_bytes)
        except ShardError as err:
            raise ShardError(f"{path}: {err}") from None
        yield path, str(sample_id), image, label


# --------------------------------------------------------------------------- writing

# Rows are written to Parquet in row groups of about this size, so the writer holds at
# most one row group in memory, not a whole shard.
ROW_GROUP_BYTES = 8 * 1024 * 1024


def _row_bytes(row: dict) -> int:
    return len(row["image"]) + len(row["label"]) + len(row["id"]) + len(row["source"]) + 8


class ShardWriter:
    """Writes rows (dicts of the contract's columns) into part-NNNNN.parquet files of at
    most max_bytes of row data each.

    A shard is closed before a row that would take it past max_bytes, so a shard is
    larger than the bound only by Parquet's own headers and footer, or when one row alone
    exceeds it. The layout (row groups, pages, metadata) depends only on the rows, so
    the same rows give byte-identical files.
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
        import pyarrow as pa
        import pyarrow.parquet as pq

        table_schema = schema()
        if self._writer is None:
            path = shard_path(self.out_dir, len(self.paths))
            self.paths.append(path)
            self._writer = pq.ParquetWriter(
                path, table_schema,
                compression="none",  # JPEG and PNG bytes are compressed already
                use_dictionary=["source"],
                write_statistics=["id", "source", "height", "width"],
            )
        columns = {name: [row[name] for row in self._rows] for name in COLUMN_NAMES}
        self._writer.write_table(pa.table(columns, schema=table_schema), row_group_size=len(self._rows))
        self._rows, self._buffered = [], 0

    def _close_shard(self) -> None:
        self._write_row_group()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._shard_bytes = 0
