"""The root of every error the project raises on purpose.

An FCNError's message is one line that names the file or value at fault and what to do;
the command line prints it instead of a traceback (pipelines.core.exits). It lives here,
in the lowest package, so that fcn_models' own errors (a broken caffemodel, a reference
file with the wrong sums) share it with everything built on top.
"""


class FCNError(Exception):
    """An error the project raises on purpose: its message says what is wrong and what to do."""
