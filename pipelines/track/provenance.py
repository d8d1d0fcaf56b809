"""Where a stage's inputs come from: the code's git commit, the shards' DVC hash, the shards as datasets.

The shards' hash is the md5 DVC gives data.shards_dir: read from dvc.lock while the
lock's file count and size still match the shard files, else computed with DVC's own
library (dvc_data), as `dvc add` would. The bytes are read once for that, the splits'
digests and the run name's fingerprint (pipelines.data.shards.file_digests). Only the
contract's files count (each split's pipelines.data.shards.FILE_PATTERN), what
preprocess leaves: a temp folder a killed preprocess left beside them is not data any
run reads, and must not change the hash. Each split is also a dataset input of a run
(name, DVC md5 of the split's directory, rows per source).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from pipelines.data.shards import COLUMNS, SPLITS, ShardError, file_digests, iter_rows, shard_files
from pipelines.track.store import TrackingError

GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own key: its UI shows it with the run
GIT_DIRTY_TAG = "fcn.git_dirty"
SHARDS_HASH_TAG = "fcn.shards_md5"
SHARDS_HASH_SOURCE_TAG = "fcn.shards_md5_from"
# What a training run logs its shards as, per split: the dataset's name and its context.
DATASET_CONTEXT = {"train": "training", "val": "validation"}


def git_state(root: Path) -> tuple[str, bool | None]:
    """(commit of HEAD, whether the tree has changes) for the project at root;
    ("unknown", None) outside a git repository or without git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        # No optional locks: reading the state must not rewrite the index.
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            return "unknown", None
        status = git("status", "--porcelain")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return head.stdout.strip(), dirty


def _contract_files(shards_dir: Path, split: str | None = None) -> list[Path]:
    """The shards of `split` (None: every split), the files DVC holds when preprocess ended
    cleanly; a temp folder a killed preprocess left beside them is not among them."""
    files = []
    for name in SPLITS if split is None else (split,):
        try:
            files += shard_files(Path(shards_dir), name)
        except ShardError:
            pass  # a missing split: the stage fails on it with its own message
    return files


def _files_size(shards_dir: Path) -> tuple[int, int]:
    files = _contract_files(shards_dir)
    return len(files), sum(p.stat().st_size for p in files)


def _locked_hash(shards_dir: Path, root: Path) -> str | None:
    """The md5 dvc.lock records for shards_dir, if it still describes the shards.

    DVC wrote it when the stage that makes the shards last ran; a count or size of
    shard files that no longer matches means the shards changed outside DVC since.
    """
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    except yaml.YAMLError:
        return None
    for stage in stages.values():
        for out in (stage or {}).get("outs") or []:
            if not isinstance(out, dict) or "path" not in out:
                continue
            if (Path(root) / out["path"]).resolve() != shards_dir.resolve():
                continue
            md5 = str(out.get("md5") or "")
            if md5.endswith(".dir") and (out.get("nfiles"), out.get("size")) == _files_size(shards_dir):
                return md5
    return None


def compute_shards_hash(shards_dir: Path, split: str | None = None) -> str:
    """The md5 DVC gives the shards directory (split None) or one split's directory (ends
    with ".dir"), over the contract's shard files only: the same value while the directory
    holds nothing else, as preprocess leaves it. DVC's own tree (dvc_data) is built from
    each file's md5, taken from the one read of the shards the stage's start shares
    (pipelines.data.shards.file_digests)."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    base = (Path(shards_dir) if split is None else Path(shards_dir) / split).resolve()
    tree = Tree()
    for file in file_digests(_contract_files(shards_dir, split)):
        tree.add(file.path.resolve().relative_to(base).parts, Meta(size=file.size), HashInfo("md5", file.md5))
    tree.digest()
    return tree.hash_info.value


def shards_hash(shards_dir: Path, root: Path) -> tuple[str, str]:
    """(DVC md5 of the shards directory, where it came from: "dvc.lock" or "computed")."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise TrackingError(f"{shards_dir}: no shards directory to hash (run `fcn preprocess`, "
                            "or check data.shards_dir)")
    locked = _locked_hash(shards_dir, Path(root))
    if locked:
        return locked, "dvc.lock"
    return compute_shards_hash(shards_dir), "computed"


_MLFLOW_TYPES = {"string": "string", "binary": "binary", "int32": "integer"}


def shard_datasets(shards_dir: Path) -> list[dict]:
    """Per split, what the shards are as a dataset: {"name" (the split), "digest" (the md5 DVC gives
    the split's directory), "rows", "sources" ({"voc": n, "sbd": m}), "uri", "files"}."""
    out = []
    for split in SPLITS:
        files = shard_files(Path(shards_dir), split)
        sources: dict[str, int] = {}
        for _, (source,) in iter_rows(files, ("source",)):
            sources[source] = sources.get(source, 0) + 1
        out.append({"name": split, "digest": compute_shards_hash(shards_dir, split), "rows": sum(sources.values()),
                    "sources": dict(sorted(sources.items())), "uri": files[0].parent.resolve().as_uri(),
                    "files": len(files)})
    return out


def log_shard_inputs(client, run_id: str, datasets: list[dict]) -> None:
    """The shards' splits as the run's dataset inputs (MLflow's log_input, through the client)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    schema = json.dumps({"mlflow_colspec": [{"type": _MLFLOW_TYPES[kind], "name": name, "required": True}
                                            for name, kind in COLUMNS]})
    inputs = [DatasetInput(
        Dataset(name=d["name"], digest=d["digest"], source_type="local", source=json.dumps({"uri": d["uri"]}),
                schema=schema, profile=json.dumps({"num_rows": d["rows"], "rows_by_source": d["sources"],
                                                   "num_files": d["files"]})),
        tags=[InputTag("mlflow.data.context", DATASET_CONTEXT[d["name"]])]) for d in datasets]
    client.log_inputs(run_id, datasets=inputs)
