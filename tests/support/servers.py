"""Waiting for a server a test started."""
import time
from pathlib import Path

import requests


def wait_for_ping(server, url: str, log: Path, seconds: float = 240) -> None:
    """Until GET <url>/ping answers; fails with the server's log if it exits or stays silent."""
    deadline = time.monotonic() + seconds
    while True:
        assert server.poll() is None, f"the server exited:\n{Path(log).read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no answer in {seconds:g} s:\n{Path(log).read_text()[-4000:]}"
        try:
            if requests.get(f"{url}/ping", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
