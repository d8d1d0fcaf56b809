"""A long-running child (a server) that goes when its command goes.

    run_group(command, env)    run it in a process group of its own until it ends; on SIGTERM
                               or SIGINT (Ctrl-C), or any exit, stop the whole group

Servers such as `mlflow ui` start processes of their own (workers, job runners); a
signal to the command alone would leave them holding the port. The child gets a
session of its own, and on the way out its group gets SIGTERM, then SIGKILL for what
is still there after `grace` seconds.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

GRACE_S = 10.0


def _stop(signum, frame):
    raise KeyboardInterrupt


def run_group(command: list[str], env: dict | None = None, grace: float = GRACE_S) -> int:
    """The child's exit status; KeyboardInterrupt when SIGTERM or SIGINT stopped it."""
    child = subprocess.Popen(command, env=env, start_new_session=True)
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        try:
            stop_group(child, grace)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def stop_group(child: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM to the child's process group; SIGKILL to what is left of it after `grace` seconds."""
    group = child.pid
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        child.poll()
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
