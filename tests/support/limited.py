"""Test helper: run an `fcn` command in a child process whose address space is capped.

A memory bound is asserted this way, never by timing: the child gets RLIMIT_AS, so a
command that allocates past it fails (MemoryError, a traceback) instead of finishing.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def run_fcn(args: list[str], limit_bytes: int, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`fcn ARGS` in a child whose address space is limited to limit_bytes; stdout and stderr as text."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # Threads each reserve address space; keep the child's pools small so the cap measures data.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=cwd or REPO, env=env,
                          preexec_fn=cap, capture_output=True, text=True, timeout=timeout)

