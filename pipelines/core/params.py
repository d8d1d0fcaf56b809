"""The one reader of params.yaml.

Every section is a frozen dataclass. Loading checks each key against the
dataclass fields and each value against its type annotation, so a typo or a bad
value fails at start-up with the key's full dotted path, not hours into a run.

Paths are resolved here, once: every field marked PATH that holds a relative path
becomes absolute against the directory of the params file (`load_params`) or the
root given to `parse_params`. URIs (s3://, file://, http://) are kept as they are;
a relative SQLite URI (sqlite:///mlflow.db) is made absolute the same way.
Nothing else in the project resolves a params path.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from fcn_models.limits import MAX_PIXELS, MAX_WIDTH
from fcn_models.norms import BACKBONE_NORMS, InputNorm, as_input_norm
from fcn_models.norms import PRESETS as INPUT_NORMS
from fcn_models.voc import NUM_CLASSES
from pipelines.core.errors import UsageError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PARAMS = PROJECT_ROOT / "params.yaml"
# The largest params file read (bytes): the project's is a few kB; a larger file is refused
# before it is parsed, so parsing can never take the machine's memory.
MAX_PARAMS_BYTES = 1 << 20
# How deep mappings and lists may nest in a params file (the project's nests four deep).
MAX_PARAMS_DEPTH = 32
# Values a params file may stand for once its YAML aliases are expanded (the full profile has a few hundred).
MAX_PARAMS_VALUES = 100_000


class ParamsError(UsageError):
    """A params file has an unknown key, a missing key or a bad value."""


# Field metadata: a filesystem path (or URI) to resolve against the params file's directory.
PATH = {"path": True}


def _path(default: Optional[str]):
    return field(default=default, metadata=PATH)


# A value in a message is shown cut short: the message stays one readable line, and showing
# it costs little even for a value built to be huge.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 80, 40, 80
_SHOWN_CHARS = 200


def shown(value: Any) -> str:
    """repr(value), truncated to a bounded length without building the whole repr first."""
    text = _REPR.repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."


def _name(key: Any) -> str:
    """A key as it appears in a dotted path, cut short like a value."""
    text = str(key)
    return text if len(text) <= _REPR.maxstring else text[:_REPR.maxstring - 3] + "..."


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ParamsError(f"{key} = {shown(value)}: {why}")


@dataclass(frozen=True)
class ArchiveParams:
    filename: str
    md5: str
    mirrors: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.md5) != 32 or any(c not in "0123456789abcdef" for c in self.md5):
            raise ParamsError(f"md5 {shown(self.md5)} of {shown(self.filename)} is not 32 lowercase hex digits")


@dataclass(frozen=True)
class DataParams:
    # Where archives are looked for before any mirror: a directory or a file:// URL.
    local_dir: Optional[str] = _path(None)
    download_dir: str = _path("data/downloads")
    raw_dir: str = _path("data/raw")
    shards_dir: str = _path("data/shards")
    stats_file: str = _path("data/stats.json")
    rejected_file: str = _path("data/rejected.json")
    voc: ArchiveParams = field(default_factory=lambda: ArchiveParams(
        filename="VOCtrainval_11-May-2012.tar",
        md5="6cd6e144f989b92b3379bac3b3de84fd",
        mirrors=["http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"],
    ))
    sbd: ArchiveParams = field(default_factory=lambda: ArchiveParams(
        filename="benchmark.tgz",
        md5="82b4d87ceb2ed10f6038a1cba92111cb",
        mirrors=[
            "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
            "semantic_contours/benchmark.tgz"
        ],
    ))
    timeout_s: float = 30.0
    retries: int = 3
    shard_max_bytes: int = 64 * 1024 * 1024
    on_bad_sample: Literal["error", "skip"] = "error"
    # 0 means one worker per CPU core.
    workers: int = 0

    def __post_init__(self):
        _check(self.timeout_s > 0, "data.timeout_s", self.timeout_s, "must be > 0")
        _check(self.retries >= 0, "data.retries", self.retries, "must be >= 0")
        _check(self.shard_max_bytes >= 1024, "data.shard_max_bytes", self.shard_max_bytes, "must be >= 1024")
        _check(self.workers >= 0, "data.workers", self.workers, "must be >= 0 (0 = all cores)")


@dataclass(frozen=True)
class ModelParams:
    backbone: str = "vgg16"
    # Scales every channel count of the trunk and fc layers: 1.0 is the paper's net.
    width: float = 1.0
    num_classes: int = NUM_CLASSES
    # ImageNet classifier weights in torchvision's state-dict format. When the file is
    # absent, FCN-32s starts from random weights, says so loudly and records it.
    imagenet_weights: Optional[str] = _path("models/imagenet/vgg16.pth")
    # Input normalisation the weights expect (a name of fcn_models.norms.PRESETS, e.g.
    # caffe-bgr for Caffe-converted weights); null: the backbone's own.
    input_norm: Optional[str] = None

    def __post_init__(self):
        _check(self.backbone in BACKBONE_NORMS, "model.backbone", self.backbone,
               f"must be one of {', '.join(BACKBONE_NORMS)}")
        _check(0 < self.width <= MAX_WIDTH, "model.width", self.width,
               f"must be in (0, {MAX_WIDTH:g}] (MAX_WIDTH in fcn_models/limits.py)")
        _check(self.num_classes >= 2, "model.num_classes", self.num_classes, "must be >= 2")
        _check(self.input_norm is None or self.input_norm in INPUT_NORMS, "model.input_norm", self.input_norm,
               f"must be null (the backbone's own) or one of {', '.join(INPUT_NORMS)}")


@dataclass(frozen=True)
class AugmentParams:
    # Random rescale of the whole image by a factor in [scale_min, scale_max].
    scale_min: float = 1.0
    scale_max: float = 1.0
    # Crop side for batch mode "crops"; images smaller than this are padded
    # (image with the mean colour, label with 255 so padding is ignored).
    crop_size: int = 512
    hflip: float = 0.5

    def __post_init__(self):
        _check(0 < self.scale_min <= self.scale_max, "augment.scale_min", self.scale_min,
               "must be > 0 and <= augment.scale_max")
        _check(self.crop_size >= 1, "augment.crop_size", self.crop_size, "must be >= 1")
        _check(0.0 <= self.hflip <= 1.0, "augment.hflip", self.hflip, "must be a probability in [0, 1]")


@dataclass(frozen=True)
class StageParams:
    # Where the stage's weights start: "imagenet" or the name of an earlier stage.
    init: str
    lr: float
    iterations: int
    # Only the score layer learns (the paper's FCN-32s-fixed row).
    fixed: bool = False
    # After this many iterations (images under train.scaling linear or sqrt) the stage goes on
    # at a tenth of its lr (pipelines/train/scaling.py); null: one rate throughout, as the reference.
    lr_step_at: Optional[int] = None

    def __post_init__(self):
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(self.iterations >= 1, "iterations", self.iterations, "must be >= 1")
        _check(self.lr_step_at is None or self.lr_step_at >= 1, "lr_step_at", self.lr_step_at,
               "must be >= 1, or null for one rate throughout")


def _reference_stages() -> dict:
    # The reference's learning rates are for a loss summed over pixels, batch 1.
    return {
        "fcn32s": StageParams(init="imagenet", lr=1e-10, iterations=100_000),
        "fcn16s": StageParams(init="fcn32s", lr=1e-12, iterations=100_000),
        "fcn8s": StageParams(init="fcn16s", lr=1e-14, iterations=100_000),
        "fcn8s-atonce": StageParams(init="imagenet", lr=1e-10, iterations=100_000),
        "fcn32s-fixed": StageParams(init="imagenet", lr=1e-10, iterations=100_000, fixed=True),
    }


@dataclass(frozen=True)
class TrainParams:
    seed: int = 0
    # "whole": the reference's batch 1 of whole images, any size; "crops": fixed-size
    # crops (augment.crop_size) in batches of batch_size, for throughput.
    batch_mode: Literal["whole", "crops"] = "whole"
    batch_size: int = 1
    # How a stage's lr, iterations and val_every follow the global batch (ray.num_workers x
    # batch_size): "none" as given; "linear" (SGD) and "sqrt" (Adam, with its betas) keep the
    # images seen and the per-image step of the reference's batch 1 (pipelines/train/scaling.py).
    scaling: Literal["none", "linear", "sqrt"] = "none"
    # Images the linear rule's warm-up lasts: 1/20 of the reference's 100,000-image stage,
    # about the share of Goyal et al.'s 5 of 90 epochs; a short run wants its own share. 0: none.
    warmup_images: int = 5000
    # "sum" over valid pixels as the reference, or "mean"; the learning rates must match.
    loss: Literal["sum", "mean"] = "sum"
    # "sgd" as the reference. "adam" (same groups: biases at 2 x lr, no decay) is for
    # nets that start from random weights, where plain SGD learns an order slower.
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.99
    weight_decay: float = 5e-4
    # Mixed precision, used only when training on a GPU (float16 with the grad scaler).
    amp: bool = True
    # bfloat16 autocast when training on CPU cores (steps and in-loop validation; weights,
    # checkpoints and evaluate stay float32). Fast only where oneDNN has bfloat16 kernels
    # (AVX512-BF16 or AMX); elsewhere the worker says so and trains in float32.
    cpu_amp: bool = False
    val_every: int = 4000
    # Steps with a non-finite loss skipped (no update) before the stage stops; 0: stop at the first.
    max_nonfinite_steps: int = 0
    # Rank 0 prints iteration, loss and it/s every this many iterations.
    log_every: int = 20
    checkpoints_to_keep: int = 2
    models_dir: str = _path("models")
    reports_dir: str = _path("reports")
    stages: dict[str, StageParams] = field(default_factory=_reference_stages)

    def __post_init__(self):
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        _check(self.batch_mode == "crops" or self.batch_size == 1, "train.batch_size", self.batch_size,
               "whole images of different sizes cannot be batched: use batch_size 1 or batch_mode crops")
        _check(self.scaling != "linear" or self.optimizer == "sgd", "train.scaling", self.scaling,
               "the linear rule (Goyal et al. 2017) is for SGD; with train.optimizer adam use sqrt")
        _check(self.scaling != "sqrt" or self.optimizer == "adam", "train.scaling", self.scaling,
               "the square-root rule (Malladi et al. 2022) is for Adam; with train.optimizer sgd use linear")
        _check(self.warmup_images >= 0, "train.warmup_images", self.warmup_images, "must be >= 0")
        _check(0 <= self.momentum < 1, "train.momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.val_every >= 1, "train.val_every", self.val_every, "must be >= 1")
        _check(self.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", self.max_nonfinite_steps, "must be >= 0")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _check(self.checkpoints_to_keep >= 1, "train.checkpoints_to_keep", self.checkpoints_to_keep, "must be >= 1")
        known = {"imagenet", *self.stages}
        for name, stage in self.stages.items():
            _check(stage.init in known, f"train.stages.{name}.init", stage.init,
                   f"must be 'imagenet' or one of the stages ({', '.join(self.stages)})")


@dataclass(frozen=True)
class RayParams:
    # Cluster to join; null means RAY_ADDRESS if set, else start a local one.
    address: Optional[str] = None
    num_workers: int = 2
    use_gpu: bool = False
    # CPUs each training worker reserves. Leave some of the machine to Ray Data's
    # decode/augment tasks, or they wait forever for a free CPU.
    cpus_per_worker: float = 1.0
    # Upper bound on CPUs Ray Data may use for decoding and augmentation.
    data_cpus: float = 1.0
    max_failures: int = 2
    # How the workers' bundles go on nodes (Ray placement group strategies): PACK as few
    # nodes as possible, SPREAD over as many; the STRICT_ forms fail rather than bend.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Where Ray Train keeps run state and checkpoints; every node must reach it.
    storage_path: str = _path("ray_results")

    def __post_init__(self):
        _check(self.num_workers >= 1, "ray.num_workers", self.num_workers, "must be >= 1")
        _check(self.cpus_per_worker > 0, "ray.cpus_per_worker", self.cpus_per_worker, "must be > 0")
        _check(self.data_cpus > 0, "ray.data_cpus", self.data_cpus, "must be > 0")
        _check(self.max_failures >= 0, "ray.max_failures", self.max_failures, "must be >= 0")


@dataclass(frozen=True)
class EvaluateParams:
    # Rows of the table, in the paper's order; a stage without a checkpoint is left out.
    stages: list[str] = field(default_factory=lambda: ["fcn32s-fixed", "fcn32s", "fcn16s", "fcn8s"])
    # DVC metrics (scores per stage) and the same scores as a table in the paper's layout.
    report_file: str = _path("reports/evaluation.json")
    table_file: str = _path("reports/evaluation.md")
    # The paper's Figure 4 (this many val images, the first by id) and the learning curves.
    figures_dir: str = _path("reports/figures")
    figure_images: int = 4
    # Images timed for the forward time per image (after one warm-up).
    timing_images: int = 20
    # The reference's released models, imported with `fcn import` into references_dir/<name>
    # (a name of fcn_models.published.REFERENCE), scored as extra rows beside ours; a name
    # without a checkpoint there is left out.
    references_dir: str = _path("models/reference")
    references: list[str] = field(default_factory=lambda: ["fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce",
                                                           "fcn-alexnet"])

    def __post_init__(self):
        _check(len(self.stages) >= 1, "evaluate.stages", self.stages, "name at least one stage")
        _check(self.timing_images >= 1, "evaluate.timing_images", self.timing_images, "must be >= 1")
        _check(self.figure_images >= 1, "evaluate.figure_images", self.figure_images, "must be >= 1")
        _check(len(set(self.references)) == len(self.references), "evaluate.references", self.references,
               "names a reference twice")


@dataclass(frozen=True)
class InferenceParams:
    # The most pixels (height x width) of an image predict, evaluate and the registered
    # model run the network on; a larger one is refused (fcn predict --downscale shrinks it).
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        _check(self.max_pixels >= 1, "inference.max_pixels", self.max_pixels, "must be >= 1")


@dataclass(frozen=True)
class MlflowParams:
    # A tracking server (http://host:5000, ...); null: MLFLOW_TRACKING_URI if set, else
    # the SQLite store db_file with artifacts in artifacts_dir, both under the project.
    tracking_uri: Optional[str] = _path(None)
    db_file: str = _path("mlflow.db")
    artifacts_dir: str = _path("mlartifacts")
    # One experiment for the whole pipeline, one run per training stage.
    experiment: str = "fcn-voc"
    # Validation images logged per stage with their predicted and true masks.
    val_images_logged: int = 4
    # The register stage: which stage's best checkpoint, the registered model's name,
    # the alias it moves when the new version is better, and where it writes its decision.
    register_stage: str = "fcn8s"
    model_name: str = "fcn-voc"
    alias: str = "champion"
    registry_file: str = _path("reports/registry.json")

    def __post_init__(self):
        _check(self.val_images_logged >= 0, "mlflow.val_images_logged", self.val_images_logged, "must be >= 0")
        _check(bool(self.experiment), "mlflow.experiment", self.experiment, "must not be empty")
        _check(bool(self.model_name), "mlflow.model_name", self.model_name, "must not be empty")
        _check(bool(self.alias), "mlflow.alias", self.alias, "must not be empty")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    train: TrainParams = field(default_factory=TrainParams)
    ray: RayParams = field(default_factory=RayParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    inference: InferenceParams = field(default_factory=InferenceParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def __post_init__(self):
        batch = self.ray.num_workers * self.train.batch_size
        # Rounded: 10 x (1 - 0.9) is 1 only to within float error.
        _check(self.train.scaling != "sqrt" or round(1 - batch * (1 - self.train.momentum), 12) > 0, "train.momentum",
               self.train.momentum,
               f"train.scaling sqrt makes Adam's beta1 1 - B x (1 - momentum) for the global batch B = "
               f"ray.num_workers x train.batch_size = {batch}, which must stay above 0: raise it above "
               f"{1 - 1 / batch:.4g} or use fewer images a step")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Return value checked against a type annotation, building nested dataclasses."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ParamsError:
                continue
        raise ParamsError(f"{key} = {shown(value)}: expected {annotation}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{key} = {shown(value)}: must be one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key} = {shown(value)}: expected a list")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key} = {shown(value)}: expected a mapping")
        return {str(k): _coerce(v, args[1], f"{key}.{_name(k)}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key} = {shown(value)}: expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key} = {shown(value)}: expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key} = {shown(value)}: expected a number")
        # YAML's .inf and .nan are floats; no knob means anything by them.
        if not math.isfinite(value):
            raise ParamsError(f"{key} = {shown(value)}: expected a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key} = {shown(value)}: expected a string")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build(cls: type, mapping: Any, prefix: str) -> Any:
    where = prefix or "top level"
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ParamsError(f"{where}: expected a mapping, got {shown(mapping)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields), key=str)
    if unknown:
        names = ", ".join(f"{prefix}.{_name(k)}" if prefix else _name(k) for k in unknown[:5])
        names += f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ParamsError(f"unknown key {names} (known in {where}: {', '.join(fields)})")
    values = {}
    for name, value in mapping.items():
        values[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    missing = [
        n for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ParamsError(f"{where}: missing key {', '.join(missing)}")
    try:
        return cls(**values)
    except ParamsError as err:
        # Checks inside a nested section know their field, not where the section sits.
        message = str(err)
        raise ParamsError(message if not prefix or message.startswith(prefix) else f"{prefix}.{message}") from None


def _resolved(value: str, root: Path) -> str:
    """A params path made absolute against root; URIs stay as they are, but a relative
    SQLite URI gets an absolute path."""
    sqlite = "sqlite:///"
    if value.startswith(sqlite):
        rest = value[len(sqlite):]
        return value if not rest or Path(rest).is_absolute() else sqlite + str(Path(root) / rest)
    if "://" in value or value.startswith("file:"):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else Path(root) / path)


def _resolve_paths(obj: Any, root: Path) -> Any:
    """A copy of a params dataclass with every PATH field resolved against root."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("path") and isinstance(value, str):
            changes[f.name] = _resolved(value, root)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _resolve_paths(value, root)
    return dataclasses.replace(obj, **changes) if changes else obj


def parse_params(mapping: Any, source: str = "params", root: str | Path | None = None) -> Params:
    """Params from a mapping, checked; with root, every relative path made absolute against it."""
    try:
        params = _build(Params, mapping, "")
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None
    return _resolve_paths(params, Path(root).resolve()) if root is not None else params


class _Refused(Exception):
    """YAML the params reader does not accept, at a line."""

    def __init__(self, mark, why: str):
        super().__init__(why)
        self.line = mark.line + 1


def _expanded_size(node, memo: dict) -> int:
    """How many values a YAML node stands for once every alias in it is written out."""
    if id(node) not in memo:
        memo[id(node)] = 1  # a node reached again through itself counts once
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else [])
        memo[id(node)] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[id(node)]


class _ParamsLoader(yaml.SafeLoader):
    """yaml's safe loader without expanding aliases, duplicate keys or deep nesting.

    An alias stands for its anchor's whole value, and aliases of aliases multiply: a few
    hundred bytes can stand for billions of values, so a document whose aliases stand for
    more than MAX_PARAMS_VALUES values is refused before anything is built from it (a
    writer such as yaml.safe_dump uses aliases for a value it meets twice: those stay
    fine). YAML lets a repeated key silently replace the first; in a params file that
    hides a setting, so it is refused."""

    _depth = 0
    _first_alias = None

    def compose_document(self):
        node = super().compose_document()
        if self._first_alias is not None and node is not None:
            size = _expanded_size(node, {})
            if size > MAX_PARAMS_VALUES:
                mark, anchor = self._first_alias
                raise _Refused(mark, f"alias *{_name(anchor)}: the file's YAML aliases stand for {size:,} values, "
                               f"more than a params file may hold ({MAX_PARAMS_VALUES:,}, MAX_PARAMS_VALUES in "
                               "pipelines/core/params.py); write the values out")
        return node

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) and self._first_alias is None:
            event = self.peek_event()
            self._first_alias = (event.start_mark, event.anchor)
        if self._depth >= MAX_PARAMS_DEPTH:
            raise _Refused(self.peek_event().start_mark,
                           f"nested more than {MAX_PARAMS_DEPTH} levels deep; no params section nests that far")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if isinstance(key, typing.Hashable) and key in seen:
                raise _Refused(key_node.start_mark, f"duplicate key {shown(key)} (first on line {seen[key]}); "
                               "YAML would keep only the last: remove one")
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate a params file; paths in it are taken from its directory.
    Raises ParamsError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the project root, or pass --params)")
    size = path.stat().st_size
    with path.open("rb") as fh:
        text = fh.read(MAX_PARAMS_BYTES + 1)  # no more than the bound, even if the file grows meanwhile
    if size > MAX_PARAMS_BYTES or len(text) > MAX_PARAMS_BYTES:
        raise ParamsError(f"{path}: {max(size, len(text)):,} bytes, more than a params file may hold "
                          f"({MAX_PARAMS_BYTES:,} bytes, MAX_PARAMS_BYTES in pipelines/core/params.py): "
                          "is it the right file?")
    try:
        mapping = yaml.load(text, Loader=_ParamsLoader)
    except _Refused as err:
        raise ParamsError(f"{path}: line {err.line}: {err}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ParamsError(f"{path}: not valid YAML: {where}{err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    return parse_params(mapping, str(path), root=path.resolve().parent)


def project_dir(params_path: str | Path) -> Path:
    """The directory a params file's paths are taken from: the project it belongs to."""
    return Path(params_path).resolve().parent


def input_norm(params: Params) -> InputNorm:
    """What the network's input is normalised with: model.input_norm, else the backbone's own."""
    return as_input_norm(params.model.input_norm or BACKBONE_NORMS[params.model.backbone])
