"""The reference's released weights into our formats.

    import_weights("fcn8s-heavy-pascal.caffemodel", "models/fcn8s")      # -> checkpoint directory
    import_weights("VGG_ILSVRC_16_layers.caffemodel", "vgg16_caffe.pth")  # -> torchvision VGG16 state dict

Sources:

- The reference's FCN caffemodels (voc-fcn32s, -fcn16s, -fcn8s, -fcn8s-atonce, -fcn-alexnet):
  Caffe layer names conv1_1 ... fc7 (or AlexNet's conv1 ... fc7), score_fr, score_pool4,
  score_pool3, upscore*, and at-once's scale_pool4 / scale_pool3 Scale layers.
- pytorch-fcn's converted state dicts (fcn32s/16s/8s/8s-atonce_from_caffe.pth): the same names
  as keys "<layer>.weight" / "<layer>.bias".
- The VGG16 ImageNet classifier, as Caffe's VGG_ILSVRC_16_layers.caffemodel (legacy V1 layers)
  or pytorch-fcn's vgg16_from_caffe.pth (already torchvision-format).

An FCN becomes our checkpoint directory (fcn_models.checkpoint): the backbone, variant,
width and class count are read off the layers present and their shapes (`variant` and
`backbone` arguments win), input_norm is caffe-bgr, and meta.json records the source
file, its sha1 and md5, and where each tensor came from. The classifier becomes a
torchvision VGG16 state dict that keeps Caffe's input convention (BGR, 0-255, mean
subtracted): load it with surgery.load_imagenet_weights(model, path, norm=CAFFE_BGR).

Files published under a known name are checked against their published sums; an
unknown file is imported with a note saying so. Nothing is written unless the whole
import succeeds, and then through a temporary path renamed into place.
"""
from __future__ import annotations

import hashlib
import os
from math import prod
import pickle
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from .backbones import build_trunk
from .caffe import CaffeFormatError, read_caffemodel
from .checkpoint import save_checkpoint
from .fcn import ATONCE_SCALES, VARIANTS, build_fcn
from .limits import MAX_WIDTH
from .norms import CAFFE_BGR
from .outputs import check_writable_under, make_dirs
from .surgery import bilinear_weight
from .weights import refused_global
from .errors import FCNError

# Published sums: pytorch-fcn's md5s (torchfcn/models/*.py) and OpenCV's sha1 of the
# reference's FCN-8s (opencv_extra testdata/dnn/download_models.py).
KNOWN_FILES = {
    "fcn32s_from_caffe.pth": ("md5", "d3eb467a80e7da0468a20dfcbc13e6c8"),
    "fcn16s_from_caffe.pth": ("md5", "a2d4035f669f09483b39c9a14a0d6670"),
    "fcn8s_from_caffe.pth": ("md5", "de93e540ec79512f8770033849c8ae89"),
    "fcn8s-atonce_from_caffe.pth": ("md5", "bfed4437e941fef58932891217fe6464"),
    "vgg16_from_caffe.pth": ("md5", "aa75b158f4181e7f6230029eb96c1b13"),
    "fcn8s-heavy-pascal.caffemodel": ("sha1", "c449ea74dd7d83751d1357d6a8c323fcf4038962"),
}
# Known files whose tensors do not say which variant they are (at-once has fcn8s's tensors).
KNOWN_VARIANTS = {"fcn8s-atonce_from_caffe.pth": "fcn8s-atonce"}
# The first convolution of each trunk and its channel count at width 1.0.
FIRST_CONV = {"vgg16": ("conv1_1", 64), "caffe-alexnet": ("conv1", 96), "alexnet": ("conv1", 64)}
IMPORTABLE_BACKBONES = tuple(FIRST_CONV)
HASH_CHUNK = 1 << 20  # per hash thread; hashlib drops the GIL for updates this large


def reference_network(name: str) -> dict:
    """What a reference model imported under `name` (models/reference/<name>) must be, as
    read_meta's keyword arguments: an FCN variant's name is that network, fcn-alexnet an
    FCN on Caffe's AlexNet; {} for any other name."""
    if name in VARIANTS:
        return {"variant": name}
    return {"backbone": "caffe-alexnet"} if name == "fcn-alexnet" else {}


class WeightsImportError(FCNError, ValueError):
    """Input that cannot be imported; the message names the file and what is wrong."""


@dataclass
class SourceTensor:
    """One tensor of the source: its stored shape, where it is, and how to read it."""
    shape: tuple[int, ...]
    legacy: bool                       # a Caffe num/channels/height/width shape (leading 1s)
    where: dict                        # {"layer": name, "blob": i} or {"key": name}
    read: Callable[[], Union[np.ndarray, torch.Tensor]]
    release: Callable[[], None] = lambda: None
    read_into: Optional[Callable[[np.ndarray], None]] = None  # fills a float32 array in place

    def describe(self) -> str:
        if "key" in self.where:
            return f"key {self.where['key']!r}"
        return f"layer {self.where['layer']!r} blob {self.where['blob']}"

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Same shape, or a legacy Caffe shape that is `shape` with leading 1s (InnerProduct
        weights were stored as 1 x 1 x out x in, biases as 1 x 1 x 1 x out)."""
        if self.shape == tuple(shape):
            return True
        return self.legacy and len(shape) <= 4 and self.shape == (1,) * (4 - len(shape)) + tuple(shape)


@dataclass
class Source:
    path: Path
    format: str
    kind: str                          # "caffemodel" or "state dict"
    layers: dict                       # layer name -> list of SourceTensor (index = blob, or 0 weight / 1 bias)
    close: Callable[[], None] = lambda: None


@dataclass
class ImportResult:
    kind: str                          # "fcn" or "classifier"
    out: Path
    source: dict
    tensors: int
    values: int
    model: dict = field(default_factory=dict)   # variant, backbone, width, num_classes (FCNs)
    notes: list = field(default_factory=list)

    def lines(self) -> list[str]:
        s = self.source
        out = [f"read {s['file']}: {s['format']}, {s['bytes']:,} bytes"]
        if self.kind == "fcn":
            m = self.model
            out.append(f"  {m['variant']}, backbone {m['backbone']}, width {m['width']:g}, {m['num_classes']} classes, "
                       "input_norm caffe-bgr")
            target = f"checkpoint {self.out} (model.pt + meta.json)"
        else:
            target = f"torchvision VGG16 state dict {self.out} (Caffe input convention: use norm=CAFFE_BGR)"
        out.append(f"  {self.tensors} tensors, {self.values:,} values -> {target}")
        out.append(f"  sha1 {s['sha1']}  md5 {s['md5']}")
        out.append(f"  {s['check']}")
        out += [f"  note: {n}" for n in self.notes]
        return out


# ---------------------------------------------------------------- sums

class _Digests:
    """sha1 and md5 of a file, each computed in its own thread with its own read of the file:
    hashlib releases the GIL on large updates, so the two sums (and the caller's work) run on
    separate cores. result() joins the threads."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = path
        self._stop = threading.Event()
        self._sums: dict = {}
        self._errors: list = []
        self._threads = [threading.Thread(target=self._hash, args=(name,), name=f"{name} of {Path(path).name}",
                                          daemon=True) for name in ("md5", "sha1")]  # md5 is the slower
        for thread in self._threads:
            thread.start()

    def _hash(self, name: str) -> None:
        h = hashlib.new(name)
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        try:
            with open(self.path, "rb", buffering=0) as fh:
                while (n := fh.readinto(buf)) and not self._stop.is_set():
                    h.update(view[:n])  # large updates run without the GIL
        except OSError as err:
            self._errors.append(err)
            return
        self._sums[name] = h.hexdigest()

    def result(self) -> dict:
        """{"sha1": ..., "md5": ...}, once both threads are done."""
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise WeightsImportError(f"{self.path}: cannot read it to check its sums: {self._errors[0]}")
        return {name: self._sums[name] for name in ("sha1", "md5")}

    def cancel(self) -> None:
        """Stop both threads (at their next chunk) and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join()


def file_digests(path: Union[str, os.PathLike]) -> dict:
    """{"sha1": ..., "md5": ...} of a file, each sum in its own thread reading the file in large chunks."""
    return _Digests(path).result()


def check_known(path: Path, sums: dict) -> tuple[bool, str]:
    """(known, what the check found); a known name with the wrong sum is an error."""
    if path.name not in KNOWN_FILES:
        return False, (f"not a known file: {path.name} is none of the published files "
                       f"({', '.join(KNOWN_FILES)}), so its sums were not checked against anything")
    algorithm, expected = KNOWN_FILES[path.name]
    if sums[algorithm] != expected:
        raise WeightsImportError(
            f"{path}: {algorithm} is {sums[algorithm]}, but the published {path.name} has {algorithm} {expected}; "
            "the file is damaged or a different one: download it again (or rename it, if it is a model of your own)"
        )
    return True, f"known file: {algorithm} matches the published {path.name}"


# ---------------------------------------------------------------- sources

_ZIP_MAGIC, _PICKLE_PROTOCOL = b"PK\x03\x04", 0x80


def open_source(path: Union[str, os.PathLike]) -> Source:
    """The file's layers: a caffemodel by content (a zip or pickle is a PyTorch file) or suffix."""
    path = Path(path)
    if not path.is_file():
        raise WeightsImportError(f"{path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:4] == _ZIP_MAGIC or (head[:1] and head[0] == _PICKLE_PROTOCOL and path.suffix != ".caffemodel"):
        return _state_dict_source(path, zipped=head[:4] == _ZIP_MAGIC)
    if path.suffix in (".pth", ".pt"):
        raise WeightsImportError(f"{path}: not a PyTorch file (it starts with neither a zip header nor a pickle)")
    return _caffe_source(path)


def _caffe_source(path: Path) -> Source:
    try:
        model = read_caffemodel(path)
    except CaffeFormatError as err:
        raise WeightsImportError(str(err)) from None
    layers = {}
    for layer in model.layers:
        if not layer.blobs:
            continue
        if layer.name in layers:
            model.close()
            raise WeightsImportError(f"{path}: two layers with weights are named {layer.name!r}")
        layers[layer.name] = [
            SourceTensor(blob.shape, blob.legacy_shape, {"layer": layer.name, "blob": i, "type": layer.type},
                         blob.values, blob.release, blob.read_into)
            for i, blob in enumerate(layer.blobs)
        ]
    version = "current `layer` messages" if model.version == "layer" else "legacy V1 `layers` messages"
    return Source(path, f"caffemodel ({version})", "caffemodel", layers, model.close)


def _state_dict_source(path: Path, zipped: bool) -> Source:
    try:
        # weights_only: tensors and plain containers only, so no code in the pickle ever runs
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as err:
        # torch's message advises unsafe loading; pass on only the object the pickle asked for
        asked = refused_global(err)
        raise WeightsImportError(
            f"{path}: refused: its pickle asks for more than tensors, so it was not run"
            + (f" (it asks for {asked})" if asked else "")
        ) from None
    except Exception as err:  # torch raises RuntimeError/EOFError/zip errors for damaged files
        raise WeightsImportError(f"{path}: not a readable PyTorch file: {type(err).__name__}: {err}"[:400]) from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsImportError(f"{path}: does not hold a state dict (a mapping of names to tensors)")
    layers: dict = {}
    for key, tensor in state.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix not in ("weight", "bias") or not prefix:
            raise WeightsImportError(f"{path}: unexpected key {key!r}: only <layer>.weight and <layer>.bias are known")
        slots = layers.setdefault(prefix, [])
        index = 0 if suffix == "weight" else 1
        while len(slots) <= index:
            slots.append(None)
        slots[index] = SourceTensor(tuple(tensor.shape), False, {"key": key}, lambda t=tensor: t)
    for prefix, slots in layers.items():
        if slots[0] is None:
            raise WeightsImportError(f"{path}: {prefix}.bias without {prefix}.weight")
    return Source(path, "PyTorch state dict", "state dict", layers)


# ---------------------------------------------------------------- conversion

def _copy(dst: torch.Tensor, src: SourceTensor) -> None:
    if src.read_into is not None and dst.dtype == torch.float32 and dst.is_contiguous():
        src.read_into(dst.detach().numpy())
        return
    values = src.read()
    with torch.no_grad():
        if isinstance(values, torch.Tensor):
            dst.copy_(values.reshape(dst.shape))
        else:
            np.copyto(dst.detach().numpy(), values.reshape(dst.shape))
    del values
    src.release()


def _allocate(model: torch.nn.Module) -> None:
    """Uninitialised CPU tensors for a model built on the meta device: every value is
    copied in from the source next, so nothing is initialised twice. (Module.to_empty
    would do the same through a much slower Python path.)"""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                              requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def _layer_of(key: str) -> tuple[str, int]:
    """Our state-dict key -> (source layer name, blob index)."""
    prefix, _, suffix = key.rpartition(".")
    return prefix.removeprefix("trunk."), 0 if suffix == "weight" else 1


def _check_layers(src: Source, plan: dict, allowed_extra: set, what: str) -> None:
    """Every planned layer present with its tensors in the planned shapes, and nothing else."""
    missing = [name for name in plan if name not in src.layers]
    if missing:
        name = missing[0]
        needs = ", ".join(f"{key} {tuple(shape)}" for _, key, shape in plan[name])
        more = f" (and {len(missing) - 1} more: {', '.join(missing[1:6])})" if len(missing) > 1 else ""
        raise WeightsImportError(f"{src.path}: missing layer {name!r}{more}: {what} needs it for {needs}")
    extra = [name for name in src.layers if name not in plan and name not in allowed_extra]
    if extra:
        shapes = ", ".join(str(t.shape) for t in src.layers[extra[0]])
        raise WeightsImportError(
            f"{src.path}: extra layer {extra[0]!r} (weights {shapes}) that {what} does not have"
            + (f"; also {', '.join(extra[1:6])}" if len(extra) > 1 else "")
            + " (pass --variant/--backbone if the detected model is not the one meant)")
    for name, slots in plan.items():
        tensors = src.layers[name]
        if len(tensors) != len(slots):
            raise WeightsImportError(
                f"{src.path}: layer {name!r} has {len(tensors)} weight tensors, {what} needs {len(slots)} "
                f"({', '.join(key for _, key, _ in slots)})")
        for index, key, shape in slots:
            tensor = tensors[index]
            if not tensor.fits(shape):
                raise WeightsImportError(
                    f"{src.path}: {tensor.describe()} has shape {tensor.shape}, {what} needs {tuple(shape)} for {key}")


def _detect(src: Source, variant: Optional[str], backbone: Optional[str]) -> tuple[str, str, float, int, list]:
    notes = []
    if backbone is None:
        if "conv1_1" in src.layers:
            backbone = "vgg16"
        elif "conv1" in src.layers:
            backbone = "caffe-alexnet"
        else:
            raise WeightsImportError(
                f"{src.path}: missing layer 'conv1_1' (VGG16) or 'conv1' (AlexNet): not one of the reference's FCNs")
    if backbone not in IMPORTABLE_BACKBONES:
        raise WeightsImportError(f"{src.path}: cannot import a {backbone} FCN: the reference's layer names are "
                                 f"known for {', '.join(IMPORTABLE_BACKBONES)}")
    first, base = FIRST_CONV[backbone]
    if first not in src.layers:
        raise WeightsImportError(f"{src.path}: missing layer {first!r}: a {backbone} FCN starts with it")
    first_weight = src.layers[first][0]
    channels = first_weight.shape[0] if first_weight.shape else 0
    width = channels / base
    if "score_fr" not in src.layers:
        raise WeightsImportError(f"{src.path}: missing layer 'score_fr': every FCN variant scores with it")
    num_classes = src.layers["score_fr"][0].shape[0] if src.layers["score_fr"][0].shape else 0
    if not width > 0 or num_classes < 1:
        raise WeightsImportError(f"{src.path}: {first} or score_fr has no output channels")
    # The width is read off one dimension; a blob with a 0 elsewhere holds no values whatever it claims.
    if width > MAX_WIDTH or 0 in first_weight.shape:
        raise WeightsImportError(
            f"{src.path}: {first_weight.describe()} has shape {first_weight.shape} ({prod(first_weight.shape)} values): "
            f"a {backbone} FCN's {first} has {base} x width output channels and weights, for a width in "
            f"(0, {MAX_WIDTH:g}] (up to {int(base * MAX_WIDTH)} channels)")
    if variant is None:
        with torch.device("meta"):
            taps = build_trunk(backbone, width).taps
        if f"score_{taps[8]}" in src.layers:
            scaled = any(f"scale_{taps[s]}" in src.layers for s in (16, 8))
            variant = "fcn8s-atonce" if scaled else KNOWN_VARIANTS.get(src.path.name, "fcn8s")
            if variant == "fcn8s" and src.kind == "state dict":
                notes.append("fcn8s and fcn8s-atonce have the same tensors; this was imported as fcn8s "
                             "(pass --variant fcn8s-atonce for an at-once model)")
        elif f"score_{taps[16]}" in src.layers:
            variant = "fcn16s"
        else:
            variant = "fcn32s"
    if variant not in VARIANTS:
        raise WeightsImportError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant, backbone, width, num_classes, notes


def _fcn_from_source(src: Source, variant: Optional[str], backbone: Optional[str]):
    variant, backbone, width, num_classes, notes = _detect(src, variant, backbone)
    try:
        with torch.device("meta"):
            model = build_fcn(variant, backbone, num_classes, width, CAFFE_BGR)
    except (ValueError, RuntimeError) as err:  # RuntimeError: a shape past what torch can describe
        raise WeightsImportError(f"{src.path}: {err}") from None
    first = FIRST_CONV[backbone][0]
    what = (f"a width-{width:g} {backbone} {variant} with {num_classes} classes "
            f"(width from {first}'s {FIRST_CONV[backbone][1] * width:g} channels)")
    plan: dict = {}
    for key, tensor in model.state_dict().items():
        layer, index = _layer_of(key)
        plan.setdefault(layer, []).append((index, key, tuple(tensor.shape)))
    scale_layers = {}
    if variant == "fcn8s-atonce":
        for stride, scale in ATONCE_SCALES.items():
            tap = model.trunk.taps[stride]
            scale_layers[f"scale_{tap}"] = (tap, model.trunk.tap_channels[stride], scale)
        if src.kind == "caffemodel":  # the reference's at-once net has them; pytorch-fcn's files do not
            for name, (tap, channels, scale) in scale_layers.items():
                if name not in src.layers:
                    raise WeightsImportError(
                        f"{src.path}: missing layer {name!r}: {what} scales {tap} by {scale} there "
                        "(an FCN-8s without it is the staged fcn8s: pass --variant fcn8s)")
    _check_layers(src, plan, set(scale_layers), what)
    scales = _check_scales(src, scale_layers, what)

    _allocate(model)
    tensors = model.state_dict(keep_vars=True)
    sources = {}
    for layer, slots in plan.items():
        for index, key, _ in slots:
            tensor = src.layers[layer][index]
            _copy(tensors[key], tensor)
            sources[key] = {k: v for k, v in tensor.where.items() if k != "type"}
    upsampling = {}
    for name, module in model.named_children():
        if isinstance(module, torch.nn.ConvTranspose2d):
            bilinear = torch.equal(module.weight, bilinear_weight(num_classes, module.kernel_size[0]))
            upsampling[name] = f"kernel {module.kernel_size[0]}, stride {module.stride[0]}, " + (
                "bilinear" if bilinear else "stored weights (not the bilinear kernel)")
            if not bilinear:
                notes.append(f"{name}'s weights are not the bilinear kernel; they are kept as stored")
    model.eval()
    return model, {"tensor_sources": sources, "atonce_scales": scales, "upsampling": upsampling}, notes


def _check_scales(src: Source, scale_layers: dict, what: str) -> dict:
    """At-once's Scale layers: one blob of the tap's channel count, every value our constant."""
    found = {}
    for name, (tap, channels, scale) in scale_layers.items():
        if name not in src.layers:
            continue
        blobs = src.layers[name]
        if len(blobs) != 1 or not blobs[0].fits((channels,)):
            raise WeightsImportError(
                f"{src.path}: layer {name!r} has weights {[b.shape for b in blobs]}, {what} needs one "
                f"({channels},) blob of {scale} (a Scale over {tap}'s channels)")
        values = np.asarray(blobs[0].read(), dtype=np.float32)
        bad = np.flatnonzero(values != np.float32(scale))
        blobs[0].release()
        if bad.size:
            raise WeightsImportError(
                f"{src.path}: layer {name!r} multiplies channel {bad[0]} by {float(values[bad[0]]):g}; {what} "
                f"multiplies {tap} by the constant {scale}")
        found[tap] = {"layer": name, "shape": [channels], "value": scale}
    return found


# torchvision VGG16's classifier: (module, Caffe layer, weight shape); fc6 sees 512 x 7 x 7 inputs.
VGG16_CLASSIFIER = (("classifier.0", "fc6", (4096, 25088)), ("classifier.3", "fc7", (4096, 4096)),
                    ("classifier.6", "fc8", (1000, 4096)))


def _vgg16_classifier_plan(caffe_names: bool) -> dict:
    """torchvision VGG16's state-dict keys and shapes (without importing torchvision, which is
    slow to import): our VGG16 trunk's convolutions under torchvision's names, then the three
    Linear layers. Grouped by source layer: Caffe's names, or torchvision's module names."""
    with torch.device("meta"):
        trunk = build_trunk("vgg16")
    layers = [(prefix, name, tuple(trunk.get_submodule(name).weight.shape))
              for name, prefix in trunk.torchvision_names.items() if name.startswith("conv")]
    plan = {}
    for prefix, caffe_name, shape in layers + list(VGG16_CLASSIFIER):
        plan[caffe_name if caffe_names else prefix] = [(0, f"{prefix}.weight", shape),
                                                       (1, f"{prefix}.bias", (shape[0],))]
    return plan


def _classifier_from_source(src: Source) -> tuple[dict, dict]:
    plan = _vgg16_classifier_plan(caffe_names=src.kind == "caffemodel")
    what = "torchvision's VGG16 (1000 classes, full width)"
    _check_layers(src, plan, set(), what)
    state, sources = {}, {}
    for layer, slots in plan.items():
        for index, key, shape in slots:
            state[key] = torch.empty(shape)
            tensor = src.layers[layer][index]
            _copy(state[key], tensor)
            sources[key] = {k: v for k, v in tensor.where.items() if k != "type"}
    return state, sources


def _is_classifier(src: Source) -> bool:
    return ("fc8" in src.layers and "score_fr" not in src.layers) or any(k.startswith("features.") for k in src.layers)


def _atomic_torch_save(obj, out: Path, before_rename: Callable[[], object] = lambda: None) -> None:
    make_dirs(out.parent, f"--out {out}")
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        before_rename()  # may raise: then nothing is left behind
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def import_weights(source: Union[str, os.PathLike], out: Union[str, os.PathLike],
                   variant: Optional[str] = None, backbone: Optional[str] = None) -> ImportResult:
    """Import a reference model (caffemodel or pytorch-fcn .pth) into `out`: a checkpoint
    directory for an FCN, a torchvision state-dict file for the VGG16 classifier."""
    path, out = Path(source), Path(out)
    if path.is_dir():
        raise WeightsImportError(f"{path}: is a directory; fcn import reads one file: a .caffemodel "
                                 "or a PyTorch state dict (.pth)")
    if not path.is_file():
        raise WeightsImportError(f"{path}: no such file")
    check_writable_under(out.parent, f"--out {out}")
    # The sums are computed in two threads while the file is parsed and converted and the
    # output written to its temporary path; they are checked before anything is renamed into
    # place, and before any other error is reported, so a known file with the wrong sum still
    # fails with the sum's message and leaves nothing written.
    info = {"file": path.name, "bytes": path.stat().st_size}
    digests = _Digests(path)

    def sums_checked() -> dict:
        if "check" not in info:
            sums = digests.result()
            known, check = check_known(path, sums)
            info.update({"sha1": sums["sha1"], "md5": sums["md5"], "known": known, "check": check})
        return {"imported_from": info}

    def wrong_sum_first() -> None:
        try:
            if "check" not in info and path.name in KNOWN_FILES:
                sums_checked()
        except WeightsImportError as wrong_sum:
            raise wrong_sum from None
        finally:
            digests.cancel()

    try:
        src = open_source(path)
    except Exception:
        wrong_sum_first()
        raise
    try:
        info["format"] = src.format
        classifier = _is_classifier(src)
        if classifier and (variant or backbone not in (None, "vgg16")):
            raise WeightsImportError(f"{path}: is an ImageNet classifier (VGG16), not an FCN: "
                                     "--variant and --backbone do not apply")
        if classifier and out.is_dir():
            raise WeightsImportError(f"{out}: is a directory; the classifier is written as one state-dict file")
        if not classifier and out.exists() and not out.is_dir():
            raise WeightsImportError(f"{out}: is a file; an FCN is written as a checkpoint directory")
        if classifier:
            state, sources = _classifier_from_source(src)
            _atomic_torch_save(state, out, before_rename=sums_checked)
            values = sum(t.numel() for t in state.values())
            return ImportResult("classifier", out, info, len(state), values)
        model, recorded, notes = _fcn_from_source(src, variant, backbone)
        save_checkpoint(out, model, {k: v for k, v in recorded.items() if v}, late_meta=sums_checked)
        tensors = model.state_dict()
        return ImportResult("fcn", out, info, len(tensors), sum(t.numel() for t in tensors.values()),
                            model={"variant": model.variant, "backbone": model.backbone_name,
                                   "width": model.width, "num_classes": model.num_classes}, notes=notes)
    except Exception:
        wrong_sum_first()
        raise
    finally:
        src.close()
        digests.cancel()


__all__ = ["import_weights", "WeightsImportError", "ImportResult", "KNOWN_FILES", "file_digests", "check_known",
           "open_source", "reference_network"]
