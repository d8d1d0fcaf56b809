"""A training stage's recipe: its network, where its weights start, and what decides its result.

    stage_variant("fcn32s-fixed")        -> "fcn32s"
    resolve_init(params, stage)          StageInit(source, path, note): ImageNet weights, random, or a stage
    RESULT_PARAMS, CODE_DEPS             the one list of what decides a stage's result
    result_params(params, stage)         those params' values, as dotted leaf keys
    stage_params(params, stage, init)    the same as strings, the stage's own as stage.*, and what
                                         train.scaling derived as derived.*: its MLflow params
    run_name(params, stage, init, root)  <stage>-<fingerprint of all of it but the iteration count>

RESULT_PARAMS and CODE_DEPS are the single source for three things that must agree:
the Ray Train run name (a changed knob is a new run, trained afresh), the params the
stage's MLflow run records (pipelines.track.stage_runs), and the params and deps dvc.yaml
lists for train@<stage> (DVC cannot import them; tests/core/test_architecture.py fails
when dvc.yaml drifts from them). A knob that is in none of them (log_every,
checkpoints_to_keep, CPUs per worker, where Ray stores runs) changes how a stage
runs, not what it produces; train.max_nonfinite_steps decides only whether a run
with bad steps ends or stops, never what it produces. The iteration count is the one knob that continues a
run: more iterations resume the same run from its last checkpoint (train.scaling derives the
steps from it, and nothing else: pipelines/train/scaling.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from fcn_models.checkpoint import FIXED_SUFFIX, META_FILE, MODEL_FILE, stage_network
from fcn_models.fcn import VARIANTS
from pipelines.core.errors import StageError
from pipelines.core.params import PROJECT_ROOT, Params, TrainParams
from pipelines.data.shards import SPLITS, FileDigest, file_digests, shard_files
from pipelines.train import scaling

# Dotted params keys whose values decide a training stage's result; "{stage}" is the
# stage's own entry of train.stages. A section name stands for all of its keys.
RESULT_PARAMS = (
    "train.stages.{stage}",
    "train.seed", "train.batch_mode", "train.batch_size", "train.scaling", "train.warmup_images", "train.loss",
    "train.optimizer",
    "train.momentum", "train.weight_decay", "train.amp", "train.cpu_amp", "train.val_every",
    "model", "augment",
    "ray.num_workers", "ray.use_gpu",
)
# The key that continues a run instead of starting another.
CONTINUES_RUN = "train.stages.{stage}.iterations"
# Knobs added after runs were named, at the value that keeps what came before: at that value
# they stay out of the run name's fingerprint, so those params name the same run as before.
NEUTRAL = {"train.scaling": "none", "train.warmup_images": TrainParams.warmup_images,
           "train.cpu_amp": TrainParams.cpu_amp, "train.stages.{stage}.lr_step_at": None}
# What train.scaling derives (fields of scaling.Scaling), recorded as derived.* with the stage's
# params; derived from RESULT_PARAMS, so they add nothing to what decides the result.
DERIVED_PARAMS = ("global_batch", "lr", "iterations", "val_every", "warmup_iterations", "momentum", "beta2",
                  "lr_step_iteration")
# The code that decides a stage's result (paths from the project root): the networks,
# the worker's loop, the data pipeline, this recipe and what of the package they
# import, and the driver, which picks the checkpoint that becomes the output (but not
# what it imports to track the run or talk to Ray: logging changes no result).
CODE_DEPS = (
    "fcn_models",
    "pipelines/core/console.py",
    "pipelines/core/errors.py",
    "pipelines/core/params.py",
    "pipelines/data/batches.py",
    "pipelines/data/dataset.py",
    "pipelines/train/loop.py",
    "pipelines/train/recipe.py",
    "pipelines/train/scaling.py",
    "pipelines/data/shards.py",
    "pipelines/train/timing.py",
    "pipelines/train/trainer.py",
)


def stage_variant(stage: str) -> str:
    """The network a stage trains: its name, without a "-fixed" suffix."""
    variant = stage_network(stage)
    if variant is None:
        raise StageError(
            f"stage {stage!r}: cannot tell its network; name a stage after one of "
            f"{', '.join(VARIANTS)} (optionally with '{FIXED_SUFFIX}')"
        )
    return variant


def stage_command(stage: str) -> str:
    return f"`fcn train --stage {stage}` (or `dvc repro train@{stage}`)"


@dataclasses.dataclass(frozen=True)
class StageInit:
    """Where a stage's weights start.

    source: "imagenet", "random" or an earlier stage's name; path: the weights file or the
    stage's checkpoint directory (None for random); note: both in words, for people.
    """
    source: str
    path: str | None
    note: str


def resolve_init(params: Params, stage: str) -> StageInit:
    """Where a stage's weights start.

    source is "imagenet", "random" (ImageNet weights asked for but absent: loudly
    warned about, and recorded in the stage's outputs) or an earlier stage's name.
    """
    if stage not in params.train.stages:
        raise StageError(f"unknown stage {stage!r}: train.stages has {', '.join(params.train.stages)}")
    init = params.train.stages[stage].init
    if init != "imagenet":
        path = Path(params.train.models_dir) / init
        if not (path / MODEL_FILE).is_file() or not (path / META_FILE).is_file():
            raise StageError(
                f"stage {stage} starts from {init}'s best checkpoint, but {path} holds none "
                f"({MODEL_FILE} and {META_FILE}): run {stage_command(init)} first"
            )
        return StageInit(init, str(path), f"{init} ({path})")
    weights = params.model.imagenet_weights
    path = Path(weights) if weights else None
    if path is not None and path.is_file():
        return StageInit("imagenet", str(path), f"imagenet ({path})")
    where = str(path) if path else "model.imagenet_weights (null)"
    return StageInit("random", None, f"random (imagenet weights not found at {where})")


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(_flatten(f"{prefix}.{key}", inner))
        return out
    return {prefix: value}


def _lookup(params: Params, dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def result_params(params: Params, stage: str) -> dict[str, Any]:
    """{dotted leaf key: value} of every param in RESULT_PARAMS, for this stage."""
    out: dict[str, Any] = {}
    for key in RESULT_PARAMS:
        dotted = key.format(stage=stage)
        out.update(_flatten(dotted, _lookup(params, dotted)))
    return out


def stage_params(params: Params, stage: str, init: StageInit | None = None) -> dict[str, str]:
    """What decides the stage's result (RESULT_PARAMS), flat, as strings; the stage's
    own entry as stage.* ("stage.lr"), so runs of different stages share their keys. With the
    resolved init (resolve_init), stage.init is where the weights really started:
    "random" when the ImageNet weights asked for are absent. What the stage runs with after
    train.scaling (pipelines.train.scaling) as derived.*, whichever the rule."""
    own = f"train.stages.{stage}."
    out = {("stage." + k[len(own):] if k.startswith(own) else k): str(v)
           for k, v in result_params(params, stage).items()}
    if init is not None:
        out["stage.init"] = str(init.source)
    derived = scaling.for_stage(params, stage)
    for key in DERIVED_PARAMS:
        out[f"derived.{key}"] = str(getattr(derived, key))
    return out


def _named_digest(files: list[FileDigest], names_from: Path) -> str:
    """_digest of files already hashed."""
    digest = hashlib.sha1()
    for file in sorted(files, key=lambda f: f.path):
        path = file.path
        digest.update(str(path.relative_to(names_from) if path.is_relative_to(names_from) else path.name).encode())
        digest.update(file.sha1)
    return digest.hexdigest()


def _digest(paths: list[Path], names_from: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(paths):
        digest.update(str(path.relative_to(names_from) if path.is_relative_to(names_from) else path.name).encode())
        with open(path, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha1").digest())
    return digest.hexdigest()


def shards_fingerprint(shards_dir: Path, split: str) -> str:
    """The run name's digest of one split's shards: _digest's, from the one read of each shard
    (pipelines.data.shards.file_digests) that the stage's DVC md5 and dataset inputs share."""
    return _named_digest(file_digests(shard_files(shards_dir, split)), Path(shards_dir) / split)


def code_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """The files of CODE_DEPS as DVC hashes them: every file of a directory (data files such
    as fcn_models/voc_classes.txt too), but not Python's bytecode caches (.dvcignore)."""
    files = []
    for dep in CODE_DEPS:
        path = root / dep
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [p for p in files if "__pycache__" not in p.parts and p.suffix != ".pyc"]


def _relative(value: Any, root: Path) -> Any:
    # Paths inside the project enter the fingerprint relative to it, so a clone elsewhere keeps its run names.
    if isinstance(value, str) and value.startswith("/") and Path(value).is_relative_to(root):
        return str(Path(value).relative_to(root))
    return value


def run_name(params: Params, stage: str, init: StageInit, root: Path) -> str:
    """<stage>-<fingerprint of everything deciding the result but the iteration count>.

    The fingerprint covers the RESULT_PARAMS values (a NEUTRAL one at its neutral value
    left out), the CODE_DEPS files, the shards (names and bytes of the contract's files,
    nothing else in the directory) and the starting weights themselves (their bytes: an
    earlier stage retrained to the same scores still gives this stage a new run). Whatever makes DVC re-run the stage
    therefore names another run, except the iteration count.
    """
    root = Path(root).resolve()
    neutral = {key.format(stage=stage): value for key, value in NEUTRAL.items()}
    values = {k: _relative(v, root) for k, v in result_params(params, stage).items()
              if k != CONTINUES_RUN.format(stage=stage) and not (k in neutral and neutral[k] == v)}
    shards_dir = Path(params.data.shards_dir)
    shards = []
    for split in SPLITS:
        try:
            shards.append((split, shards_fingerprint(shards_dir, split)))
        except ValueError:
            shards.append((split, None))  # no shards yet: the stage fails on them with its own message
    if init.path is None:
        weights = init.source
    elif init.source == "imagenet":
        weights = _digest([Path(init.path)], Path(init.path).parent)
    else:
        weights = _digest([Path(init.path) / META_FILE, Path(init.path) / MODEL_FILE], Path(init.path))
    fingerprint = {"params": values, "init": weights, "shards": shards,
                   "code": _digest(code_files(), PROJECT_ROOT)}
    digest = hashlib.sha1(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
    return f"{stage}-{digest[:10]}"
