"""Reading Caffe's .caffemodel files without Caffe or generated protobuf code.

A .caffemodel is one serialized `caffe.NetParameter` (BVLC caffe.proto). Only
the parts that carry weights are read:

    NetParameter      1 name, 100 layer (LayerParameter, current), 2 layers (V1LayerParameter, legacy)
    LayerParameter    1 name, 2 type (string), 7 blobs
    V1LayerParameter  4 name, 5 type (LayerType enum), 6 blobs, 1 V0 layer (refused)
    BlobProto         7 shape (BlobShape: 1 dim, int64), 5 data (float), 8 double_data (double),
                      1 num, 2 channels, 3 height, 4 width (legacy 4-D shape); 6/9 diffs skipped

Everything else is skipped by its wire type. The file is memory-mapped and
parsed in place, touching only the bytes that say where things are; there is
no message size limit. `Blob.read_into` reads packed floats straight from the
file into the caller's array (one copy, like numpy.fromfile); `Blob.values`
gives them as a numpy view of the mapped bytes, or one vectorised gather for
unpacked values: never a Python loop per value. `release` drops a blob's
mapped pages from this process, so the mapping never adds a second copy of
the file to the resident set. Errors name the file and the byte offset.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Optional, Union

import numpy as np
from .errors import FCNError

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5

# V1LayerParameter.LayerType -> the current type string (caffe's upgrade_proto.cpp mapping).
V1_LAYER_TYPES = {
    0: "", 35: "AbsVal", 1: "Accuracy", 30: "ArgMax", 2: "BNLL", 3: "Concat", 37: "ContrastiveLoss",
    4: "Convolution", 39: "Deconvolution", 5: "Data", 6: "Dropout", 32: "DummyData", 7: "EuclideanLoss",
    25: "Eltwise", 38: "Exp", 8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 28: "HingeLoss", 11: "Im2col",
    12: "ImageData", 13: "InfogainLoss", 14: "InnerProduct", 15: "LRN", 29: "MemoryData",
    16: "MultinomialLogisticLoss", 34: "MVN", 17: "Pooling", 26: "Power", 18: "ReLU", 19: "Sigmoid",
    27: "SigmoidCrossEntropyLoss", 36: "Silence", 20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split",
    33: "Slice", 23: "TanH", 24: "WindowData", 31: "Threshold",
}

# Unpacked repeated values: one tag byte per value (field << 3 | wire type).
_FLOAT_TAG, _DOUBLE_TAG = (5 << 3) | FIXED32, (8 << 3) | FIXED64
_SCAN_RECORDS = 1 << 20  # unpacked values checked per numpy pass


class CaffeFormatError(FCNError, ValueError):
    """A file that cannot be read as a Caffe model; the message names the file and the byte."""

    def __init__(self, path: Union[str, os.PathLike], offset: Optional[int], problem: str):
        self.path, self.offset, self.problem = os.fspath(path), offset, problem
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{self.path}: not a readable Caffe model{where}: {problem}")


@dataclass
class Blob:
    """One BlobProto: its shape and where its values lie in the file."""
    offset: int                      # byte offset of the BlobProto message
    end: int
    shape: tuple[int, ...] = ()
    legacy_shape: bool = False       # from num/channels/height/width rather than BlobShape
    segments: list = field(default_factory=list)  # (dtype, first byte, count, stride)
    _model: Optional["CaffeModel"] = field(default=None, repr=False, compare=False)

    @property
    def count(self) -> int:
        return sum(n for _, _, n, _ in self.segments)

    def values(self) -> np.ndarray:
        """The values as a flat float32 array: a read-only view of the mapped file when
        they are stored packed as float, else a new array."""
        buf = self._model._buffer()
        parts = []
        for dtype, start, count, stride in self.segments:
            if stride == np.dtype(dtype).itemsize:
                part = np.frombuffer(buf, dtype=dtype, count=count, offset=start)
            else:  # unpacked: [tag, value] records; the value bytes start one past the tag
                rows = np.frombuffer(buf, dtype=np.uint8, count=count * stride, offset=start).reshape(count, stride)
                part = np.ascontiguousarray(rows[:, 1:]).view(dtype).reshape(count)
            parts.append(part)
        if not parts:
            return np.zeros(0, np.float32)
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def read_into(self, out: np.ndarray) -> None:
        """Fill `out` (float32, C-contiguous, `count` values) with the values. Packed floats
        are read straight from the file into it (one copy, no mapped pages touched)."""
        if out.dtype != np.float32 or out.size != self.count or not out.flags.c_contiguous:
            raise ValueError(f"read_into needs a contiguous float32 array of {self.count} values")
        if len(self.segments) == 1 and self.segments[0][0] == "<f4" and self.segments[0][3] == 4 \
                and np.little_endian:
            target = memoryview(out.reshape(-1)).cast("B")
            self._model._pread(target, self.segments[0][1])
        else:
            np.copyto(out.reshape(-1), self.values())
            self.release()

    def release(self) -> None:
        """Drop this blob's pages from the process (they stay in the page cache)."""
        if self._model is not None:
            self._model._release(self.offset, self.end)


@dataclass
class Layer:
    name: str
    type: str
    blobs: list[Blob]
    offset: int
    version: str  # "layer" (current) or "layers" (V1)


class CaffeModel:
    """A parsed .caffemodel: `layers` in file order; the file stays mapped until close()."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self.name = ""
        self.layers: list[Layer] = []
        self._file = None
        self._map: Optional[mmap.mmap] = None
        try:
            self._file = open(self.path, "rb")
            self.size = os.fstat(self._file.fileno()).st_size
            if self.size == 0:
                raise CaffeFormatError(self.path, 0, "the file is empty")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(self._map, "madvise"):
                self._map.madvise(mmap.MADV_SEQUENTIAL)
            _Parser(self).net()
        except BaseException:
            self.close()
            raise
        if not self.layers:
            self.close()
            raise CaffeFormatError(self.path, None, "it holds no layers (an empty net, or not a NetParameter)")

    @property
    def version(self) -> str:
        return self.layers[0].version

    def _buffer(self) -> mmap.mmap:
        if self._map is None:
            raise ValueError(f"{self.path} is closed")
        return self._map

    def _pread(self, target: memoryview, offset: int) -> None:
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        fd, done = self._file.fileno(), 0
        while done < len(target):
            n = os.preadv(fd, [target[done:]], offset + done)
            if n <= 0:
                raise CaffeFormatError(self.path, offset + done, "the file ended while reading a blob "
                                       "(did it change while being read?)")
            done += n

    def _release(self, start: int, end: int) -> None:
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start -= start % mmap.PAGESIZE
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, min(end, self.size) - start)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view: the mapping goes when it does
                pass
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "CaffeModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_caffemodel(path: Union[str, os.PathLike]) -> CaffeModel:
    """Parse a .caffemodel (use as a context manager, or close() it)."""
    return CaffeModel(path)


class _Parser:
    """Protocol buffer wire format over the mapped bytes of one file."""

    def __init__(self, model: CaffeModel):
        self.model = model
        self.buf = model._map
        self.path = model.path
        self.size = model.size

    def fail(self, offset, problem):
        raise CaffeFormatError(self.path, offset, problem)

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        start, value, shift, buf = pos, 0, 0, self.buf
        while True:
            if pos >= end:
                self.fail(start, "a number runs past the end of the file (truncated?)" if end >= self.size
                          else f"a number runs past the end of its message (byte {end})")
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7
            if shift >= 70:
                self.fail(start, "a number longer than 10 bytes")

    def field(self, pos: int, end: int, what: str) -> tuple[int, int, int, int, int, int]:
        """The field at pos: (number, wire type, tag offset, value start, value end -- or the
        value itself for a varint --, offset of the next field)."""
        tag_at = pos
        tag, pos = self.varint(pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            self.fail(tag_at, f"field number 0 in {what} (corrupt data)")
        if wire == VARINT:
            value, pos = self.varint(pos, end)
            return number, wire, tag_at, pos, value, pos
        if wire == LENGTH:
            length, start = self.varint(pos, end)
            stop = start + length
            if stop > end:
                self.fail(tag_at, f"{what} field {number} says it holds {length} bytes from byte {start}, "
                          + (f"but the file ends at byte {self.size} (truncated?)" if end >= self.size
                             else f"past the end of its message at byte {end}"))
            return number, wire, tag_at, start, stop, stop
        if wire in (FIXED32, FIXED64):
            width = 4 if wire == FIXED32 else 8
            if pos + width > end:
                self.fail(tag_at, f"a {width}-byte value runs past the end of "
                          + ("the file (truncated?)" if end >= self.size else f"its message at byte {end}"))
            return number, wire, tag_at, pos, pos + width, pos + width
        self.fail(tag_at, f"wire type {wire} in {what} field {number} "
                  "(groups and types 6/7 never occur in caffe.proto: corrupt data)")

    def fields(self, pos: int, end: int, what: str):
        while pos < end:
            number, wire, tag_at, start, stop, pos = self.field(pos, end, what)
            yield number, wire, tag_at, start, stop

    def expect(self, wire, wanted, tag_at, what):
        if wire != wanted:
            self.fail(tag_at, f"{what} has wire type {wire}, caffe.proto says {wanted}")

    def string(self, start, end, tag_at, what) -> str:
        try:
            return bytes(self.buf[start:end]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(tag_at, f"{what} is not UTF-8 text")

    def net(self) -> None:
        versions = set()
        for number, wire, tag_at, start, end in self.fields(0, self.size, "NetParameter"):
            if number == 1:
                self.expect(wire, LENGTH, tag_at, "the net name")
                self.model.name = self.string(start, end, tag_at, "the net name")
            elif number in (100, 2):
                self.expect(wire, LENGTH, tag_at, "a layer")
                layer = self.layer(start, end, tag_at) if number == 100 else self.v1_layer(start, end, tag_at)
                versions.add(layer.version)
                self.model.layers.append(layer)
        if len(versions) > 1:
            self.fail(None, "it mixes current `layer` (field 100) and legacy `layers` (field 2) messages, "
                      "which Caffe itself refuses")

    def layer(self, pos, end, at) -> Layer:
        name, type_, blobs = "", "", []
        for number, wire, tag_at, start, stop in self.fields(pos, end, "LayerParameter"):
            if number == 1:
                self.expect(wire, LENGTH, tag_at, "a layer name")
                name = self.string(start, stop, tag_at, "a layer name")
            elif number == 2:
                self.expect(wire, LENGTH, tag_at, "a layer type")
                type_ = self.string(start, stop, tag_at, "a layer type")
            elif number == 7:
                self.expect(wire, LENGTH, tag_at, "a blob")
                blobs.append(self.blob(start, stop, tag_at))
        return Layer(name, type_, blobs, at, "layer")

    def v1_layer(self, pos, end, at) -> Layer:
        name, type_, blobs = "", "", []
        for number, wire, tag_at, start, stop in self.fields(pos, end, "V1LayerParameter"):
            if number == 4:
                self.expect(wire, LENGTH, tag_at, "a layer name")
                name = self.string(start, stop, tag_at, "a layer name")
            elif number == 5:
                self.expect(wire, VARINT, tag_at, "a V1 layer type")
                type_ = V1_LAYER_TYPES.get(stop, f"V1 type {stop}")
            elif number == 6:
                self.expect(wire, LENGTH, tag_at, "a blob")
                blobs.append(self.blob(start, stop, tag_at))
            elif number == 1:
                self.fail(tag_at, "a V0 layer (Caffe's format before 2014), which this reader does not read; "
                          "convert the file with Caffe's tools/upgrade_net_proto_binary first")
        return Layer(name, type_, blobs, at, "layers")

    def blob(self, pos, end, at) -> Blob:
        blob = Blob(offset=at, end=end, _model=self.model)
        dims, legacy = None, {}
        while pos < end:
            number, wire, tag_at, start, stop, pos = self.field(pos, end, "BlobProto")
            if number == 7:
                self.expect(wire, LENGTH, tag_at, "a blob shape")
                dims = self.blob_shape(start, stop)
            elif number in (5, 8):
                dtype, width, tag = ("<f4", 4, _FLOAT_TAG) if number == 5 else ("<f8", 8, _DOUBLE_TAG)
                if wire == LENGTH:  # packed
                    if (stop - start) % width:
                        self.fail(tag_at, f"packed {'float' if width == 4 else 'double'} data of {stop - start} "
                                  f"bytes, not a multiple of {width}")
                    blob.segments.append((dtype, start, (stop - start) // width, width))
                elif wire == (FIXED32 if width == 4 else FIXED64):
                    # unpacked: one tag per value; take the whole run of them in one go
                    count = self.unpacked_run(tag_at, end, tag, width + 1)
                    blob.segments.append((dtype, tag_at, count, width + 1))
                    pos = tag_at + count * (width + 1)
                else:
                    self.expect(wire, LENGTH, tag_at, "blob data")
            elif number in (1, 2, 3, 4):
                self.expect(wire, VARINT, tag_at, "a legacy blob dimension")
                legacy[number] = stop
        if blob.segments and len({d for d, *_ in blob.segments}) > 1:
            self.fail(at, "a blob holds both float and double data")
        if dims is not None:
            blob.shape = dims
        elif legacy:
            blob.shape = tuple(legacy.get(i, 0) for i in (1, 2, 3, 4))
            blob.legacy_shape = True
        if prod(blob.shape) != blob.count:
            self.fail(at, f"a blob of shape {blob.shape} ({prod(blob.shape)} values) holds {blob.count} values")
        return blob

    def unpacked_run(self, pos, end, tag, stride) -> int:
        """How many consecutive [tag, value] records start at pos (the first one is known to)."""
        count = 0
        while True:
            n = min(_SCAN_RECORDS, (end - pos) // stride)
            if n == 0:
                return count
            tags = np.frombuffer(self.buf, dtype=np.uint8, count=n * stride, offset=pos)[::stride]
            mismatch = np.flatnonzero(tags != tag)
            if mismatch.size:
                return count + int(mismatch[0])
            count += n
            pos += n * stride

    def blob_shape(self, pos, end) -> tuple[int, ...]:
        dims = []
        for number, wire, tag_at, start, stop in self.fields(pos, end, "BlobShape"):
            if number != 1:
                continue
            if wire == VARINT:
                dims.append(stop)
            elif wire == LENGTH:
                p = start
                while p < stop:
                    value, p = self.varint(p, stop)
                    dims.append(value)
            else:
                self.expect(wire, LENGTH, tag_at, "a blob dimension")
        for d in dims:
            if d >= 1 << 63:
                self.fail(pos, f"a negative blob dimension ({d - (1 << 64)})")
        return tuple(dims)


__all__ = ["CaffeModel", "CaffeFormatError", "Layer", "Blob", "read_caffemodel", "V1_LAYER_TYPES"]
