"""The errors every part of the workflow shares; each module's own errors derive from FCNError too.

    FCNError     the root (fcn_models.errors): exits.run_main prints its line, status 1
    UsageError   the command line or the params file is wrong: status 2
    StageError   a stage that cannot run as configured: status 1
"""
from fcn_models.errors import FCNError


class UsageError(FCNError, ValueError):
    """The command line or the params file is wrong; the message names the value and what to do."""


class StageError(FCNError, RuntimeError):
    """A stage that cannot run as configured; the message says what to do."""
