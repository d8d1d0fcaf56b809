"""The local Ray cluster a driver started ends with the driver, however the driver ends.

    python -m pipelines.train.reaper PID      started by pipelines.train.cluster.connect; stdin: a pipe from PID

The kernel ends Ray's GCS and raylet when the driver that started them dies (Ray
asks for that), but the raylet's agents (DashboardAgent, RuntimeEnvAgent) then wait
for the GCS that is gone, a minute or more, holding their ports on 127.0.0.1. This
process notes the driver's descendants while the driver lives; when the driver
ends, the pipe closes, and it kills every noted process still running, then exits.
It runs in a session of its own, so a signal to the driver's process group (Ctrl-C,
`kill -- -PGID`) spares it. psutil refuses to signal a pid that now belongs to
another process.
"""
from __future__ import annotations

import os
import select
import sys

import psutil

POLL_S = 1.0


def watch(driver_pid: int, pipe_fd: int = 0) -> int:
    """Note driver_pid's descendants until `pipe_fd` closes (or the driver is gone), then
    kill those still running; return how many were killed."""
    me = os.getpid()
    noted: dict[tuple[int, float], psutil.Process] = {}
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    while True:
        ready, _, _ = select.select([pipe_fd], [], [], POLL_S)
        try:
            for child in driver.children(recursive=True):
                if child.pid != me:
                    noted.setdefault((child.pid, child.create_time()), child)
        except psutil.NoSuchProcess:
            break
        except psutil.Error:
            pass
        if ready and not os.read(pipe_fd, 4096):
            break
    killed = 0
    for process in noted.values():
        try:
            process.kill()
            killed += 1
        except psutil.Error:
            pass
    return killed


if __name__ == "__main__":
    watch(int(sys.argv[1]))
