"""A stage's driver process: who it is, whether a recorded one still runs, and its hold on a run.

    identity()                  {"host", "pid", "started"}: this process
    is_gone(record)             True when the recorded driver ran on this host and no longer runs
    describe(record)            "host vm, pid 1234, started 2026-12-01 22:41:07"
    with hold_run(storage, name): ...   one driver per Ray run, or RunHeldError naming the holder

The hold is an exclusive flock on <storage>/.driver-locks/<name>.lock, in the
storage directory beside the run's own (which it neither creates nor touches): the
kernel drops it when the process ends, however it ends, so a killed driver never
leaves a stale lock. The file holds the holder's identity, for the
message a second driver stops with. Storage given as a URI (s3://...) cannot be
locked that way: the lock is then a file in this machine's temporary directory,
which keeps two drivers on one machine apart, not two on different machines.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import psutil

from fcn_models.errors import FCNError

LOCK_DIR = ".driver-locks"
# Two readings of one process's start time differ by clock-tick rounding at most.
START_TIME_TOLERANCE_S = 1.0


class RunHeldError(FCNError, RuntimeError):
    """Another driver trains this run; the message names it."""


def identity() -> dict:
    """This process as a driver: host name, pid and start time (seconds since the epoch)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def is_gone(record: dict) -> bool:
    """Whether the driver `record` describes ran on this host and is no longer running
    (no such pid, or the pid now belongs to a process started at another time).
    A driver on another host is never known to be gone."""
    try:
        host, pid, started = str(record["host"]), int(record["pid"]), float(record["started"])
    except (KeyError, TypeError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) > START_TIME_TOLERANCE_S or \
            process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def describe(record: dict) -> str:
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["started"])))
    except (KeyError, TypeError, ValueError):
        started = "at an unknown time"
    return f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started {started}"


def lock_path(storage: str, name: str) -> Path:
    """Where the hold on run `name` in `storage` is kept."""
    if "://" not in storage:
        return Path(storage) / LOCK_DIR / f"{name}.lock"
    digest = hashlib.sha1(f"{storage.rstrip('/')}/{name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "fcn-run-locks" / f"{digest}.lock"


@contextlib.contextmanager
def hold_run(storage: str, name: str):
    """Hold run `name` in `storage` for this process, or raise RunHeldError at once."""
    path = lock_path(storage, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            raise RunHeldError(
                f"run {name} in {storage} is being trained by another driver ({describe(holder)}; lock {path}): "
                "one run, one driver. Wait for it to end, or stop it (Ctrl-C in its terminal, or "
                f"kill -INT {holder.get('pid', '<pid>')}), then run this again: it resumes from the last "
                "checkpoint") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(identity()) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _read_holder(fd: int) -> dict:
    # The holder writes its identity right after locking: give it a moment.
    for _ in range(20):
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode() or "null")
            if isinstance(record, dict):
                return record
        except ValueError:
            pass
        time.sleep(0.05)
    return {}
