"""The one reader of params.yaml.

Every section is a frozen dataclass. Loading checks each key against the
dataclass fields and each value against its type annotation, so a typo or a bad
value fails at start-up with the key's full dotted path, not hours into a run.
Relative paths are kept as written; callers resolve them against the project
root (the directory holding params.yaml).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = PROJECT_ROOT / "params.yaml"


class ParamsError(ValueError):
    """A params file has an unknown key, a missing key or a bad value."""


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ParamsError(f"{key} = {value!r}: {why}")


@dataclass(frozen=True)
class ArchiveParams:
    filename: str
    md5: str
    mirrors: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.md5) != 32 or any(c not in "0123456789abcdef" for c in self.md5):
            raise ParamsError(f"md5 {self.md5!r} of {self.filename} is not 32 lowercase hex digits")


@dataclass(frozen=True)
class DataParams:
    # Where archives are looked for before any mirror: a directory or a file:// URL.
    local_dir: Optional[str] = None
    download_dir: str = "data/downloads"
    raw_dir: str = "data/raw"
    shards_dir: str = "data/shards"
    stats_file: str = "data/stats.json"
    rejected_file: str = "data/rejected.json"
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
class Params:
    data: DataParams = field(default_factory=DataParams)


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
        raise ParamsError(f"{key} = {value!r}: expected {annotation}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{key} = {value!r}: must be one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key} = {value!r}: expected a list")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key} = {value!r}: expected a mapping")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key} = {value!r}: expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key} = {value!r}: expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key} = {value!r}: expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key} = {value!r}: expected a string")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build(cls: type, mapping: Any, prefix: str) -> Any:
    where = prefix or "top level"
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ParamsError(f"{where}: expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
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
    return cls(**values)


def parse_params(mapping: Any, source: str = "params") -> Params:
    try:
        return _build(Params, mapping, "")
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate a params file; raise ParamsError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the project root, or pass --params)")
    with path.open() as fh:
        try:
            mapping = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(mapping, str(path))


def resolve(path: str | Path, root: Path = PROJECT_ROOT) -> Path:
    """A params path made absolute against the project root."""
    path = Path(path)
    return path if path.is_absolute() else root / path
