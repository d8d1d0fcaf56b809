"""MLflow's command line in this environment.

    mlflow_cli()    the `mlflow` beside this Python, used by `fcn ui`

`fcn serve` runs MLflow's scoring app itself, behind a body limit: pipelines.serve.scoring_app.
"""
from __future__ import annotations

import sys
from pathlib import Path


def mlflow_cli() -> str:
    """This environment's mlflow, not whichever one PATH finds first."""
    return str(Path(sys.executable).with_name("mlflow"))
