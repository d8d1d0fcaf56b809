"""Test helper: write .caffemodel files in Caffe's protobuf wire format, and deploy prototxts.

Deliberately independent of fcn_models.caffe (the reader under test): the
encoding below is written from caffe.proto's field numbers, and OpenCV's Caffe
importer, which parses these files with the real protobuf library, checks it.

Fields are written in field-number order, as Caffe's C++ serializer does, with a
few fields the reader must skip (bottom/top names, V1 blobs_lr as unpacked
floats, V2 phase and loss_weight). Large arrays are streamed to the file, never
joined into one bytes object.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

# caffe.proto V1LayerParameter.LayerType values for the types the tests write.
V1_TYPES = {"Convolution": 4, "Deconvolution": 39, "InnerProduct": 14, "ReLU": 18, "Pooling": 17,
            "Dropout": 6, "Softmax": 20, "LRN": 15, "Eltwise": 25, "Data": 5}


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf encodes negative int32/int64
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


class Message:
    """Chunks (bytes or numpy arrays) of one encoded message, with their total size."""

    def __init__(self):
        self.chunks: list = []
        self.size = 0

    def _add(self, chunk) -> "Message":
        self.chunks.append(chunk)
        self.size += chunk.nbytes if isinstance(chunk, np.ndarray) else len(chunk)
        return self

    def varint(self, number: int, value: int) -> "Message":
        return self._add(_key(number, 0) + _varint(value))

    def fixed32_float(self, number: int, value: float) -> "Message":
        return self._add(_key(number, 5) + np.float32(value).astype("<f4").tobytes())

    def bytes_field(self, number: int, payload: bytes) -> "Message":
        return self._add(_key(number, 2) + _varint(len(payload)) + payload)

    def string(self, number: int, text: str) -> "Message":
        return self.bytes_field(number, text.encode())

    def message(self, number: int, sub: "Message") -> "Message":
        self._add(_key(number, 2) + _varint(sub.size))
        for chunk in sub.chunks:
            self._add(chunk)
        return self

    def packed_array(self, number: int, values: np.ndarray) -> "Message":
        self._add(_key(number, 2) + _varint(values.nbytes))
        return self._add(values)

    def unpacked_array(self, number: int, values: np.ndarray) -> "Message":
        wire = 5 if values.dtype.itemsize == 4 else 1
        tag = _key(number, wire)
        assert len(tag) == 1
        records = np.empty((values.size, 1 + values.dtype.itemsize), np.uint8)
        records[:, 0] = tag[0]
        records[:, 1:] = values.reshape(-1, 1).view(np.uint8)
        return self._add(records.reshape(-1))

    def write(self, fh) -> None:
        for chunk in self.chunks:
            fh.write(memoryview(np.ascontiguousarray(chunk)).cast("B") if isinstance(chunk, np.ndarray) else chunk)


def blob_message(values: np.ndarray, *, legacy: bool = False, packed: bool = True, double: bool = False) -> Message:
    """A BlobProto: shape as BlobShape (field 7) or legacy num/channels/height/width (1-4),
    values as float data (5) or double_data (8), packed or one tag per value."""
    m = Message()
    shape = tuple(values.shape)
    if legacy:
        if len(shape) > 4:
            raise ValueError("legacy blobs have at most 4 axes")
        for number, dim in zip((1, 2, 3, 4), (1,) * (4 - len(shape)) + shape):
            m.varint(number, dim)
    flat = np.ascontiguousarray(values, dtype="<f8" if double else "<f4").reshape(-1)
    data_field = 8 if double else 5
    if not double:
        (m.packed_array if packed else m.unpacked_array)(data_field, flat)
    if not legacy:
        dims = b"".join(_varint(d) for d in shape)
        m.message(7, Message().bytes_field(1, dims) if dims else Message())
    if double:
        (m.packed_array if packed else m.unpacked_array)(data_field, flat)
    return m


def empty_blob_layer(name: str, type_: str, shapes: Sequence[tuple]) -> Message:
    """A LayerParameter whose blobs claim these shapes and hold no values: consistent for a
    shape with a 0 in it, however large its other dimensions (numpy cannot make such an array)."""
    m = Message().string(1, name).string(2, type_)
    for shape in shapes:
        blob = Message().packed_array(5, np.zeros(0, "<f4"))
        m.message(7, blob.message(7, Message().bytes_field(1, b"".join(_varint(d) for d in shape))))
    return m


def layer_message(name: str, type_: str, blobs: Sequence[np.ndarray], *, v1: bool = False,
                  bottoms=(), tops=(), **blob_options) -> Message:
    m = Message()
    if v1:  # V1LayerParameter: bottom 2, top 3, name 4, type 5 (enum), blobs 6, blobs_lr 7
        for b in bottoms:
            m.string(2, b)
        for t in tops:
            m.string(3, t)
        m.string(4, name)
        m.varint(5, V1_TYPES[type_])
        for values in blobs:
            m.message(6, blob_message(values, **blob_options))
        for lr in (1.0, 2.0)[:len(blobs)]:
            m.fixed32_float(7, lr)
    else:  # LayerParameter: name 1, type 2, bottom 3, top 4, loss_weight 5, blobs 7, phase 10
        m.string(1, name)
        m.string(2, type_)
        for b in bottoms:
            m.string(3, b)
        for t in tops:
            m.string(4, t)
        if type_ == "SoftmaxWithLoss":
            m.fixed32_float(5, 1.0)
        for values in blobs:
            m.message(7, blob_message(values, **blob_options))
        m.varint(10, 1)  # phase: TEST
    return m


def write_caffemodel(path, layers, *, name: str = "net", v1: bool = False, **blob_options) -> Path:
    """layers: (name, type, [arrays]) or (name, type, [arrays], bottoms, tops) in net order, or
    a ready LayerParameter Message. NetParameter: name 1, V1 `layers` 2, current `layer` 100."""
    net = Message().string(1, name)
    for spec in layers:
        if isinstance(spec, Message):
            net.message(2 if v1 else 100, spec)
            continue
        layer_name, type_, blobs = spec[:3]
        bottoms, tops = (spec[3], spec[4]) if len(spec) == 5 else ((), ())
        net.message(2 if v1 else 100, layer_message(layer_name, type_, blobs, v1=v1, bottoms=bottoms, tops=tops,
                                                    **blob_options))
    path = Path(path)
    with open(path, "wb") as fh:
        net.write(fh)
    return path


# ---------------------------------------------------------------- reference layer graphs

@dataclass
class NetLayer:
    name: str
    type: str
    bottoms: list
    top: str
    params: str = ""                              # prototxt body after bottom/top
    blob_shapes: list = field(default_factory=list)


def _ch(c: int, width: float) -> int:
    return max(1, round(c * width))


def _conv(name, bottom, cin, cout, k, *, pad=0, stride=1, group=1, top=None):
    params = (f"convolution_param {{ num_output: {cout} kernel_size: {k} pad: {pad} stride: {stride}"
              + (f" group: {group}" if group != 1 else "") + " }")
    return NetLayer(name, "Convolution", [bottom], top or name, params, [(cout, cin // group, k, k), (cout,)])


def _relu(name, blob):
    return NetLayer(name, "ReLU", [blob], blob)


def _pool(name, bottom, k, s):
    return NetLayer(name, "Pooling", [bottom], name, f"pooling_param {{ pool: MAX kernel_size: {k} stride: {s} }}")


def _deconv(name, bottom, classes, k, s):
    return NetLayer(name, "Deconvolution", [bottom], name,
                    f"convolution_param {{ num_output: {classes} kernel_size: {k} stride: {s} bias_term: false }}",
                    [(classes, classes, k, k)])


def _crop(name, bottom, reference, offset):
    return NetLayer(name, "Crop", [bottom, reference], name, f"crop_param {{ axis: 2 offset: {offset} }}")


def _sum(name, a, b):
    return NetLayer(name, "Eltwise", [a, b], name, "eltwise_param { operation: SUM }")


def vgg16_fcn(variant: str, width: float, classes: int = 21, crop_shift: dict | None = None) -> list[NetLayer]:
    """The deploy graph of the reference's voc-fcn32s/16s/8s/8s-atonce net.py at a width,
    crop offsets as in its prototxts (19; 5, 27; 5, 9, 31), `crop_shift` added per crop name."""
    shift = crop_shift or {}
    layers, cin, bottom = [], 3, "data"
    for b, n in enumerate([2, 2, 3, 3, 3], start=1):
        cout = _ch([64, 128, 256, 512, 512][b - 1], width)
        for i in range(1, n + 1):
            layers.append(_conv(f"conv{b}_{i}", bottom, cin, cout, 3, pad=100 if (b, i) == (1, 1) else 1))
            layers.append(_relu(f"relu{b}_{i}", f"conv{b}_{i}"))
            bottom, cin = f"conv{b}_{i}", cout
        layers.append(_pool(f"pool{b}", bottom, 2, 2))
        bottom = f"pool{b}"
    fc = _ch(4096, width)
    layers += [_conv("fc6", "pool5", cin, fc, 7), _relu("relu6", "fc6"),
               NetLayer("drop6", "Dropout", ["fc6"], "fc6", "dropout_param { dropout_ratio: 0.5 }"),
               _conv("fc7", "fc6", fc, fc, 1), _relu("relu7", "fc7"),
               NetLayer("drop7", "Dropout", ["fc7"], "fc7", "dropout_param { dropout_ratio: 0.5 }"),
               _conv("score_fr", "fc7", fc, classes, 1)]
    c3, c4 = _ch(256, width), _ch(512, width)

    def skip(pool, channels, scale):
        source = pool
        if variant == "fcn8s-atonce":
            source = f"scale_{pool}"
            layers.append(NetLayer(source, "Scale", [pool], source,
                                   f"scale_param {{ filler {{ type: 'constant' value: {scale} }} }}", [(channels,)]))
        layers.append(_conv(f"score_{pool}", source, channels, classes, 1))

    if variant == "fcn32s":
        layers += [_deconv("upscore", "score_fr", classes, 64, 32), _crop("score", "upscore", "data", 19 + shift.get("score", 0))]
    elif variant == "fcn16s":
        layers.append(_deconv("upscore2", "score_fr", classes, 4, 2))
        skip("pool4", c4, 0.01)
        layers += [_crop("score_pool4c", "score_pool4", "upscore2", 5 + shift.get("score_pool4c", 0)),
                   _sum("fuse_pool4", "upscore2", "score_pool4c"),
                   _deconv("upscore16", "fuse_pool4", classes, 32, 16),
                   _crop("score", "upscore16", "data", 27 + shift.get("score", 0))]
    else:
        layers.append(_deconv("upscore2", "score_fr", classes, 4, 2))
        skip("pool4", c4, 0.01)
        layers += [_crop("score_pool4c", "score_pool4", "upscore2", 5 + shift.get("score_pool4c", 0)),
                   _sum("fuse_pool4", "upscore2", "score_pool4c"),
                   _deconv("upscore_pool4", "fuse_pool4", classes, 4, 2)]
        skip("pool3", c3, 0.0001)
        layers += [_crop("score_pool3c", "score_pool3", "upscore_pool4", 9 + shift.get("score_pool3c", 0)),
                   _sum("fuse_pool3", "upscore_pool4", "score_pool3c"),
                   _deconv("upscore8", "fuse_pool3", classes, 16, 8),
                   _crop("score", "upscore8", "data", 31 + shift.get("score", 0))]
    return layers


def alexnet_fcn32s(width: float, classes: int = 21, crop_shift: dict | None = None) -> list[NetLayer]:
    """The reference's voc-fcn-alexnet graph: conv1 (pad 100) relu pool1 norm1, conv2 (group 2)
    relu pool2 norm2, conv3, conv4 (group 2), conv5 (group 2), pool5, fc6 6x6, fc7, score_fr,
    upscore 63/32, crop 18."""
    def ch(c):  # grouped convolutions need even channel counts
        return 2 * _ch(c // 2, width)
    c1, c2, c3, c4, c5, fc = ch(96), ch(256), ch(384), ch(384), ch(256), _ch(4096, width)
    lrn = "lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }"
    shift = (crop_shift or {}).get("score", 0)
    return [
        _conv("conv1", "data", 3, c1, 11, pad=100, stride=4), _relu("relu1", "conv1"),
        _pool("pool1", "conv1", 3, 2), NetLayer("norm1", "LRN", ["pool1"], "norm1", lrn),
        _conv("conv2", "norm1", c1, c2, 5, pad=2, group=2), _relu("relu2", "conv2"),
        _pool("pool2", "conv2", 3, 2), NetLayer("norm2", "LRN", ["pool2"], "norm2", lrn),
        _conv("conv3", "norm2", c2, c3, 3, pad=1), _relu("relu3", "conv3"),
        _conv("conv4", "conv3", c3, c4, 3, pad=1, group=2), _relu("relu4", "conv4"),
        _conv("conv5", "conv4", c4, c5, 3, pad=1, group=2), _relu("relu5", "conv5"),
        _pool("pool5", "conv5", 3, 2),
        _conv("fc6", "pool5", c5, fc, 6), _relu("relu6", "fc6"),
        NetLayer("drop6", "Dropout", ["fc6"], "fc6", "dropout_param { dropout_ratio: 0.5 }"),
        _conv("fc7", "fc6", fc, fc, 1), _relu("relu7", "fc7"),
        NetLayer("drop7", "Dropout", ["fc7"], "fc7", "dropout_param { dropout_ratio: 0.5 }"),
        _conv("score_fr", "fc7", fc, classes, 1),
        _deconv("upscore", "score_fr", classes, 63, 32),
        _crop("score", "upscore", "data", 18 + shift),
    ]


def vgg16_classifier() -> list[NetLayer]:
    """VGG_ILSVRC_16_layers: 13 3x3 convolutions (pad 1), 2x2 pools, fc6/fc7 4096 and fc8 1000
    as InnerProduct layers (fc6 sees 512 x 7 x 7 = 25088 inputs)."""
    layers, cin, bottom = [], 3, "data"
    for b, n in enumerate([2, 2, 3, 3, 3], start=1):
        cout = [64, 128, 256, 512, 512][b - 1]
        for i in range(1, n + 1):
            layers.append(_conv(f"conv{b}_{i}", bottom, cin, cout, 3, pad=1))
            layers.append(_relu(f"relu{b}_{i}", f"conv{b}_{i}"))
            bottom, cin = f"conv{b}_{i}", cout
        layers.append(_pool(f"pool{b}", bottom, 2, 2))
        bottom = f"pool{b}"

    def fc(name, bottom, cin, cout):
        return NetLayer(name, "InnerProduct", [bottom], name, f"inner_product_param {{ num_output: {cout} }}",
                        [(cout, cin), (cout,)])
    # Activations get their own tops here (not in place, unlike the original) so that the
    # "fc7" and "relu7" outputs can both be read back unambiguously.
    layers += [fc("fc6", "pool5", 25088, 4096), NetLayer("relu6", "ReLU", ["fc6"], "relu6"),
               NetLayer("drop6", "Dropout", ["relu6"], "drop6", "dropout_param { dropout_ratio: 0.5 }"),
               fc("fc7", "drop6", 4096, 4096), NetLayer("relu7", "ReLU", ["fc7"], "relu7"),
               NetLayer("drop7", "Dropout", ["relu7"], "drop7", "dropout_param { dropout_ratio: 0.5 }"),
               fc("fc8", "drop7", 4096, 1000)]
    return layers


def deploy_prototxt(layers: list[NetLayer], height: int, width: int, name: str = "net") -> str:
    lines = [f'name: "{name}"',
             f'layer {{ name: "input" type: "Input" top: "data" '
             f'input_param {{ shape {{ dim: 1 dim: 3 dim: {height} dim: {width} }} }} }}']
    for layer in layers:
        bottoms = " ".join(f'bottom: "{b}"' for b in layer.bottoms)
        lines.append(f'layer {{ name: "{layer.name}" type: "{layer.type}" {bottoms} top: "{layer.top}" {layer.params} }}')
    return "\n".join(lines) + "\n"


def model_layers(net: list[NetLayer], weights: dict) -> list:
    """(name, type, [arrays], bottoms, tops) for write_caffemodel, in net order."""
    return [(layer.name, layer.type, weights.get(layer.name, []), layer.bottoms, [layer.top]) for layer in net]
