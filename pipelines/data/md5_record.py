"""An archive's md5, remembered beside it (<archive>.md5.json) while its size and mtime stay the same.

Hashing a 2 GB archive takes tens of seconds; the record lets a reused archive be trusted
without it, the trade-off DVC makes for its cache (bytes changed in place with both kept
go unnoticed; `fcn fetch --verify` hashes again). download writes and checks records,
archives reads them for the extraction marker.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipelines.core.files import file_md5, write_json


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".md5.json")


def remember_md5(path: Path, md5: str) -> None:
    st = path.stat()
    try:
        write_json(record_path(path), {"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    except OSError:
        pass  # a read-only directory only costs a re-hash next time


def recorded_md5(path: Path, trust_record: bool = True) -> str:
    """md5 of a file, trusting the record beside it while the file's size and mtime are unchanged
    (trust_record=False: hashed again, the record rewritten)."""
    path = Path(path)
    st = path.stat()
    try:
        record = json.loads(record_path(path).read_text())
        if trust_record and record["size"] == st.st_size and record["mtime_ns"] == st.st_mtime_ns:
            return str(record["md5"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    md5 = file_md5(path)
    remember_md5(path, md5)
    return md5


def forget_md5(path: Path) -> None:
    """Remove the record beside a file (the file is gone or untrusted)."""
    record_path(path).unlink(missing_ok=True)
