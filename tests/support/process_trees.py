"""The processes a command started, and whether any is left once it is stopped."""
from __future__ import annotations

import contextlib
import signal
import socket
import time

import psutil


@contextlib.contextmanager
def ctrl_c_reaches_children():
    """Children started inside take Ctrl-C as from a terminal.

    A shell without job control starts a background command with SIGINT ignored, the
    ignoring is inherited through exec, and Python installs its KeyboardInterrupt handler only
    where SIGINT is not ignored: under `bash .ci/run &` a child would ignore the SIGINT a test
    sends it. A handled signal is back to its default in an exec'd child, so handling it here
    while the child starts gives the child Python's usual handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie waiting for its parent counts as gone)."""
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
        except psutil.NoSuchProcess:
            pass
    return left


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(processes)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def kill_all(processes: list[psutil.Process]) -> None:
    for process in alive(processes):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
