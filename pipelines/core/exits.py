"""How an entry point ends: one line on stderr and the exit status, the same in every command.

    0    done
    1    the command could not do its work (an FCNError: bad input, missing file, failed run;
         or an OSError: a file that cannot be read or written): the line says why
    2    the params file or the command line is wrong (a UsageError)
    130  interrupted (Ctrl-C): the line says how to resume

Every error the project raises on purpose derives from fcn_models.errors.FCNError, so no
entry point lists what to catch; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

from fcn_models.errors import FCNError
from pipelines.core.errors import UsageError

DONE, FAILED, BAD_PARAMS, INTERRUPTED = 0, 1, 2, 130


def run_main(prog: str, body: Callable[[], int | None], resume: str = "run the same command again") -> int:
    """Run an entry point's body; turn a UsageError, an FCNError, an OSError (a file that cannot
    be read or written names itself) or an interrupt into its line and status."""
    try:
        return int(body() or DONE)
    except UsageError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return BAD_PARAMS
    except (FCNError, OSError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {resume}", file=sys.stderr)
        return INTERRUPTED
