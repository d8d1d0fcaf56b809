"""Safe extraction of a tar archive, with a marker that says the tree on disk is whole.

Extraction goes into a temporary directory inside the target, refusing any member that
is a link, a device, a FIFO, an absolute path or a path with "..", with tarfile's "data"
filter as a second line of defence. The archive's top-level directories are then renamed
into place and a marker "<target>/.<filename>.extracted.json" records the archive md5 and
every file's path and size. A later run skips extraction while the marker's md5 matches
and every recorded file exists with its recorded size; otherwise it extracts again,
replacing the archive's top-level directories. A crash leaves no marker, so nothing
half-extracted is ever trusted.
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

from pipelines.core.console import say
from pipelines.core.files import write_json
from pipelines.data.download import FetchError
from pipelines.data.md5_record import recorded_md5


class UnsafeArchiveError(FetchError):
    """An archive member that would escape the target or is not a plain file/dir."""


def _checked_name(member: tarfile.TarInfo, archive: Path) -> str:
    """The member's normalised relative path, or UnsafeArchiveError naming it."""
    name = member.name
    where = f"{archive}: member {name!r}"
    if member.issym():
        raise UnsafeArchiveError(f"{where} is a symbolic link (to {member.linkname!r}); links are refused")
    if member.islnk():
        raise UnsafeArchiveError(f"{where} is a hard link (to {member.linkname!r}); links are refused")
    if member.ischr() or member.isblk():
        raise UnsafeArchiveError(f"{where} is a device file; only files and directories are extracted")
    if member.isfifo():
        raise UnsafeArchiveError(f"{where} is a FIFO; only files and directories are extracted")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(f"{where} has unsupported type {member.type!r}; "
                                 f"only files and directories are extracted")
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{where} is an absolute path; refusing to extract it")
    if ".." in name.replace("\\", "/").split("/"):
        raise UnsafeArchiveError(f"{where} contains '..' and could land outside the target; refusing it")
    return posixpath.normpath(name)


def _intact(marker: Path, md5: str, target_dir: Path) -> list[Path] | None:
    """The top-level paths recorded by the marker, if the tree on disk still matches it."""
    try:
        record = json.loads(marker.read_text())
        if record["md5"] != md5:
            return None
        for rel, size in record["files"].items():
            if os.stat(target_dir / rel).st_size != size:
                return None
        top = [target_dir / name for name in record["top_level"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return top if all(p.exists() for p in top) else None


def _marker_path(archive: Path, target_dir: Path) -> Path:
    return Path(target_dir) / f".{Path(archive).name}.extracted.json"


def is_extracted(archive: Path, target_dir: Path) -> bool:
    """True when target_dir holds the archive's extracted tree, as recorded by safe_extract."""
    return _intact(_marker_path(archive, target_dir), recorded_md5(archive), Path(target_dir)) is not None


def safe_extract(archive: Path, target_dir: Path) -> list[Path]:
    """Extract archive into target_dir (skipped when already there); return its top-level paths."""
    archive, target_dir = Path(archive), Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    md5 = recorded_md5(archive)
    marker = _marker_path(archive, target_dir)
    top = _intact(marker, md5, target_dir)
    if top is not None:
        say(f"fetch: {archive.name} already extracted in {target_dir} ({', '.join(p.name for p in top)})")
        return top

    marker.unlink(missing_ok=True)
    prefix = f".extract-{archive.name}-"
    for stale in target_dir.glob(prefix + "*"):  # left by a run that was killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    say(f"fetch: extracting {archive} -> {target_dir}")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target_dir))
    try:
        files = {}
        try:
            # Stream mode: one pass over the (possibly gzipped) archive, each member checked before it is written.
            with tarfile.open(archive, "r|*") as tar:
                for member in tar:
                    rel = _checked_name(member, archive)
                    try:
                        tar.extract(member, tmp, filter="data")
                    except tarfile.FilterError as err:
                        raise UnsafeArchiveError(f"{archive}: member {member.name!r} refused: {err}") from None
                    if member.isreg():
                        files[rel] = member.size
        except (tarfile.TarError, EOFError, zlib.error) as err:
            raise FetchError(f"{archive}: cannot be read as a tar archive ({err}); delete it and run again") from None
        names = sorted(os.listdir(tmp))
        if not names:
            raise FetchError(f"{archive}: the archive is empty")
        trash = tmp / ".replaced"
        trash.mkdir()
        for name in names:
            final = target_dir / name
            if final.exists() or final.is_symlink():
                os.rename(final, trash / name)
            os.rename(tmp / name, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(marker, {"archive": archive.name, "md5": md5, "top_level": names, "files": files})
    say(f"fetch: extracted {len(files)} files from {archive.name} in {time.monotonic() - started:.1f} s")
    return [target_dir / name for name in names]
