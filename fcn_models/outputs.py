"""Making the directory an output goes in, with one clear error when a file stands in the way.

    make_dirs(directory, what)   directory and its parents created; OutputPathError naming the file
                                 on the path when one of them is a file (mkdir says only "File exists")
    check_writable_under(path, what)  the same error, before any work, without creating anything
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .errors import FCNError


class OutputPathError(FCNError, OSError):
    """An output path that cannot be created; the message names the file in the way."""


def _file_in_the_way(directory: Path) -> Path | None:
    """The first of directory and its parents, from the root down, that exists and is no directory."""
    for part in reversed((directory, *directory.parents)):
        if part.exists() and not part.is_dir():
            return part
    return None


def _refuse(part: Path, what: str) -> OutputPathError:
    return OutputPathError(
        f"{what}: {part} is a file, not a directory, so nothing can be written under it: "
        f"choose a path whose parents are directories, or move {part} away")


def check_writable_under(directory: Union[str, os.PathLike], what: str) -> None:
    """OutputPathError when a file stands where `directory` or one of its parents must be."""
    part = _file_in_the_way(Path(directory))
    if part is not None:
        raise _refuse(part, what)


def make_dirs(directory: Union[str, os.PathLike], what: str) -> Path:
    """Create `directory` with its parents; `what` names it in the message (e.g. "--out PATH")."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        part = _file_in_the_way(directory)
        if part is None:
            raise
        raise _refuse(part, what) from None
    return directory


__all__ = ["OutputPathError", "make_dirs", "check_writable_under"]
