"""The extracted VOC2012 and SBD trees: which samples each split takes, and reading one sample.

    train = every id of SBD dataset/train.txt (image img/<id>.jpg, label cls/<id>.mat GTcls.Segmentation)
    val   = the seg11valid ids (pipelines.data.shards.SEG11VALID_FILE) that VOC2012's segmentation val.txt
            lists (image JPEGImages/<id>.jpg, label SegmentationClass/<id>.png, palette indices)

`load_sample` checks one sample completely (the JPEG decodes to its last pixel, the
label has the image's size and only class ids 0..20 or the void label) and returns
the shard row it becomes; `load_in_order` runs it over a pool of worker processes
with bounded memory. The preprocess stage writes the rows with shards.ShardWriter.
"""
from __future__ import annotations

import io
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError

from fcn_models.errors import FCNError
from fcn_models.voc import NUM_CLASSES, VOID
from pipelines.data.shards import SEG11VALID_FILE, ShardError, read_id_list

# zlib level for label PNGs: level 1 writes several times faster than 9 and the label is
# a few KB beside a JPEG of 50-150 KB. Any fixed level gives the same bytes every run.
LABEL_PNG_LEVEL = 1
# Samples per task sent to a worker, and chunks kept in flight per worker.
CHUNK = 8
CHUNKS_IN_FLIGHT_PER_WORKER = 4


class RawDataError(ShardError):
    """Raw trees that cannot make the splits; the message says what to fix."""


# --------------------------------------------------------------------------- splits

def voc_root(raw_dir: Path) -> Path:
    return Path(raw_dir) / "VOCdevkit" / "VOC2012"


def sbd_root(raw_dir: Path) -> Path:
    return Path(raw_dir) / "benchmark_RELEASE" / "dataset"


@dataclass(frozen=True)
class Splits:
    train: list[str]
    val: list[str]
    seg11valid_count: int


def split_ids(raw_dir: Path, seg11valid_file: Path = SEG11VALID_FILE) -> Splits:
    """train = SBD train.txt; val = seg11valid ids listed in VOC2012 val.txt; both sorted."""
    train_list = sbd_root(raw_dir) / "train.txt"
    voc_val_list = voc_root(raw_dir) / "ImageSets" / "Segmentation" / "val.txt"
    train = sorted(read_id_list(train_list))
    voc_val = set(read_id_list(voc_val_list))
    seg11valid = read_id_list(seg11valid_file)
    val = sorted(i for i in seg11valid if i in voc_val)
    if not train:
        raise RawDataError(f"{train_list}: lists no ids")
    if not val:
        raise RawDataError(
            f"none of the {len(seg11valid)} ids of {seg11valid_file} appear in {voc_val_list}: "
            "is data.raw_dir the extracted VOC2012 trainval archive?"
        )
    overlap = sorted(set(train) & set(val))
    if overlap:
        shown = ", ".join(overlap[:5]) + (", ..." if len(overlap) > 5 else "")
        raise RawDataError(
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

class BadSample(FCNError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# "<_io.BytesIO object at 0x7f...>" in a library's message: the bytes being read.
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _why(err: BaseException) -> str:
    """A library error as a reason that is the same on every run: no object addresses."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image file PIL can identify"
    text = _OBJECT_REPR.sub("the file's data", str(err))
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise BadSample(path, f"missing {what} file") from None
    except OSError as err:
        raise BadSample(path, f"cannot read {what} file: {err.strerror or _why(err)}") from None


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
        raise BadSample(path, f"image does not decode: {_why(err)}") from None
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
            raise BadSample(path, f"label .mat has no readable GTcls.Segmentation: {_why(err)}") from None
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
            raise BadSample(path, f"label does not decode: {_why(err)}") from None
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


