"""Progress lines on stdout, one owner for every stage and worker.

Inside a Ray Train worker print() is patched to also go through logging, which shows
every line twice; a plain write to stdout does not, so every progress line goes here.
"""
import sys


def say(line: str) -> None:
    """One progress line on stdout, flushed at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
