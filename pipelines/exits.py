"""How a stage's entry point ends: one line on stderr and the exit status, the same in every stage.

    0    done
    1    the stage could not do its work (bad input, missing file, failed run, a file that
         cannot be read or written): the line says why
    2    the params file or the command line is wrong
    130  interrupted (Ctrl-C): the line says how to resume
"""
from __future__ import annotations

import sys
from typing import Callable

from pipelines.params import ParamsError

DONE, FAILED, BAD_PARAMS, INTERRUPTED = 0, 1, 2, 130


def run_main(prog: str, body: Callable[[], int | None], errors: tuple[type[BaseException], ...],
             resume: str = "run the same command again",
             usage_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a stage's body; turn a ParamsError (or one of `usage_errors`), one of `errors`, an
    OSError (a file that cannot be read or written names itself) or an interrupt into its
    line and status."""
    try:
        return int(body() or DONE)
    except (ParamsError, *usage_errors) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return BAD_PARAMS
    except (*errors, OSError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {resume}", file=sys.stderr)
        return INTERRUPTED
