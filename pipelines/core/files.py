"""Writing files and directories so that no reader ever sees half of one.

Every stage output that a later stage (or DVC) reads goes through here: the bytes
go to a temp file beside the target, which is then renamed over it; a directory is
built beside its target and swapped in.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from fcn_models.outputs import make_dirs


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path` (parents created), then rename it over `path`."""
    path = Path(path)
    make_dirs(path.parent, str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """atomic_write_bytes for UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def replace_dir(staging: Path, target: Path) -> None:
    """Move the complete directory `staging` into place as `target` (same filesystem).

    A directory cannot be renamed over a non-empty one, so an existing target is first
    renamed aside, then removed once the new one is in place: a reader sees the old
    directory or the new one, never a mix.
    """
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old)


def write_json(path: Path, obj) -> None:
    """obj as indented, key-sorted JSON, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in blocks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_md5(path: Path) -> str:
    """The md5 of a file, read in blocks (archive checksums; not for security)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
