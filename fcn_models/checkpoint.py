"""Checkpoints: a directory holding model.pt (a plain state dict) and meta.json.

meta.json says how to rebuild the model (variant, backbone, width, num_classes)
and how to feed it (input_norm), plus whatever the caller adds (the stage it
came from, val scores, ...). A checkpoint is written into a temporary directory
next to the target and renamed into place, so a reader sees either the old
checkpoint or the complete new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

import torch

from . import subnormals
from .backbones import build_trunk
from .fcn import FCN, VARIANTS, build_fcn
from .norms import InputNorm
from .outputs import make_dirs
from .weights import read_state_dict

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
MODEL_KEYS = ("variant", "backbone", "width", "num_classes", "input_norm")
# A training stage named <variant>-fixed trains <variant> (with a fixed learning rate).
FIXED_SUFFIX = "-fixed"


def stage_network(stage: str) -> str | None:
    """The network a training stage trains: its name without a "-fixed" suffix; None when that
    names no network."""
    variant = stage[: -len(FIXED_SUFFIX)] if stage.endswith(FIXED_SUFFIX) else stage
    return variant if variant in VARIANTS else None


def model_meta(model: FCN) -> dict:
    return {
        "variant": model.variant,
        "backbone": model.backbone_name,
        "width": model.width,
        "num_classes": model.num_classes,
        "input_norm": model.input_norm.to_dict(),
    }


def save_checkpoint(directory: Union[str, os.PathLike], model: FCN, meta: dict | None = None,
                    late_meta: Callable[[], dict] | None = None) -> Path:
    """Write model.pt and meta.json into `directory` (replacing an existing checkpoint there).
    `late_meta`, if given, is called once model.pt is written and its items join `meta` (for
    values computed while the weights are written); if it raises, nothing is written."""
    directory = Path(directory)
    own = model_meta(model)

    def as_json(meta: dict) -> str:
        for key, value in meta.items():
            if key in own and value != own[key]:
                raise ValueError(f"meta[{key!r}] = {value!r} contradicts the model's own {own[key]!r}")
        return json.dumps({**meta, **own}, indent=2, sort_keys=True)  # fails here if not JSON

    meta = dict(meta or {})
    text = as_json(meta)  # before anything is written

    make_dirs(directory.parent, f"checkpoint {directory}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, tmp / MODEL_FILE)
        if late_meta is not None:
            text = as_json({**meta, **late_meta()})
        (tmp / META_FILE).write_text(text + "\n")
        if directory.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / directory.name)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_meta(directory: Union[str, os.PathLike], variant: str | None = None, backbone: str | None = None) -> dict:
    """meta.json of a checkpoint directory, checked for the keys needed to rebuild the model
    and that it describes the network `variant` (without one: the network of the stage it
    names, if any) on the trunk `backbone`, when given (ValueError otherwise)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    for name in (MODEL_FILE, META_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"checkpoint {directory} is incomplete: {name} is missing (a checkpoint needs {MODEL_FILE} "
                f"and {META_FILE}; write it with fcn_models.checkpoint.save_checkpoint)"
            )
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{directory / META_FILE} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{directory / META_FILE} holds no JSON object: cannot rebuild the model")
    missing = [k for k in MODEL_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{directory / META_FILE} lacks {', '.join(missing)}: cannot rebuild the model")
    if variant is not None and meta["variant"] != variant:
        raise ValueError(f"{directory / META_FILE} says its network is {meta['variant']}, but {directory} must "
                         f"hold an {variant}")
    trained = stage_network(meta["stage"]) if variant is None and isinstance(meta.get("stage"), str) else None
    if trained is not None and meta["variant"] != trained:
        raise ValueError(f"{directory / META_FILE} says its network is {meta['variant']}, but the stage it names, "
                         f"{meta['stage']}, trains an {trained}: the checkpoint is mislabelled; replace it")
    if backbone is not None and meta["backbone"] != backbone:
        raise ValueError(f"{directory / META_FILE} says its trunk is {meta['backbone']}, but {directory} must "
                         f"hold a {backbone} network")
    return meta


def _described(directory: Path, meta: dict, device=None) -> FCN:
    """The network meta.json describes, built on `device` (the meta device: shapes only)."""
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return build_fcn(meta["variant"], meta["backbone"], int(meta["num_classes"]), float(meta["width"]),
                             InputNorm.from_dict(meta["input_norm"]))
    except (TypeError, ValueError, OverflowError, RuntimeError) as err:
        raise ValueError(f"{directory / META_FILE}: {err}") from None


def _held(state: dict, described: FCN) -> str:
    """What a state dict holds, in the terms of meta.json: the variant its score layers make,
    its classes, and its first trunk layer's shape (against the same trunk at width 1.0)."""
    taps = described.trunk.taps
    if f"score_{taps.get(8)}.weight" in state:
        variant = "fcn8s (or fcn8s-atonce)"
    elif f"score_{taps.get(16)}.weight" in state:
        variant = "fcn16s"
    else:
        variant = "fcn32s" if "score_fr.weight" in state else "no FCN score layers"
    score = state.get("score_fr.weight")
    classes = f", {score.shape[0]} classes" if score is not None and score.ndim >= 1 else ""
    with torch.device("meta"):
        unit = build_trunk(described.backbone_name, 1.0).state_dict()
    first = next((k for k in state if k.startswith("trunk.") and k.removeprefix("trunk.") in unit
                  and state[k].ndim == 4), None)
    if first is None:
        return f"{variant}{classes}, and no {described.backbone_name} trunk layers"
    channels, base = state[first].shape[0], unit[first.removeprefix("trunk.")].shape[0]
    return (f"{variant}{classes}, {first} {tuple(state[first].shape)} "
            f"(width {channels / base:g} of a {described.backbone_name})")


def _check_shapes(directory: Path, meta: dict, state: dict, described: FCN) -> None:
    """model.pt's names and shapes against the network meta.json describes, before anything of
    that size is allocated: a wrong meta.json costs nothing."""
    expected = {k: tuple(v.shape) for k, v in described.state_dict().items()}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if not (missing or extra or wrong):
        return
    problems = []
    for keys, say in ((missing, "lacks"), (extra, "has an extra"), (wrong, "has")):
        if keys:
            first = (f"{keys[0]} {tuple(state[keys[0]].shape)} where it needs {expected[keys[0]]}"
                     if keys is wrong else keys[0])
            problems.append(f"{say} {first}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""))
    raise ValueError(
        f"{directory / MODEL_FILE} does not match the network {META_FILE} describes ({meta['variant']}, "
        f"{meta['backbone']}, width {meta['width']}, {meta['num_classes']} classes): it {'; '.join(problems)}. "
        f"What the weights hold: {_held(state, described)}; fix {META_FILE} or replace {MODEL_FILE}")


def load_checkpoint(directory: Union[str, os.PathLike], map_location="cpu",
                    variant: str | None = None, backbone: str | None = None) -> tuple[FCN, dict]:
    """Rebuild the model described by meta.json and load model.pt into it: (model, meta).

    variant, backbone: the network and trunk the checkpoint must hold (read_meta). Every way
    model.pt can be unusable (empty, truncated, not tensors, not the network meta.json
    describes) is a ValueError naming it; the shapes are checked before the network is built."""
    directory = Path(directory)
    meta = read_meta(directory, variant, backbone)
    state = read_state_dict(directory / MODEL_FILE, map_location=map_location)
    _check_shapes(directory, meta, state, _described(directory, meta, "meta"))
    model = _described(directory, meta)
    try:
        model.load_state_dict(state)
        subnormals.flush_module_(model)  # a network holding subnormals runs many times slower on a CPU
    except RuntimeError as err:
        raise ValueError(f"{directory / MODEL_FILE} does not load into the network {META_FILE} describes: "
                         f"{' '.join(str(err).split())}") from None
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model, meta


__all__ = ["save_checkpoint", "load_checkpoint", "read_meta", "model_meta", "stage_network"]
