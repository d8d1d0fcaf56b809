"""MLflow's command line in this environment: the executable, and the scoring server's command and environment.

    mlflow_cli()                                 the `mlflow` beside this Python
    server_command(model, host, port, workers)   `mlflow models serve` of a model, in this environment
    server_env(store)                            its environment: this bin first on PATH, the store

Used by `fcn serve`, `fcn ui` and bench/bench_serve.py, so that the benchmark times the
server the command starts.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def mlflow_cli() -> str:
    """This environment's mlflow, not whichever one PATH finds first."""
    return str(Path(sys.executable).with_name("mlflow"))


def server_command(model: str, host: str, port: int, workers: int) -> list[str]:
    return [mlflow_cli(), "models", "serve", "-m", model, "--env-manager", "local", "--host", host,
            "--port", str(port), "--workers", str(workers)]


def server_env(store: str) -> dict:
    """This environment's bin first on PATH (the server starts `uvicorn` from there); the model URI
    resolved against `store`."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "MLFLOW_TRACKING_URI": store,
            "MLFLOW_REGISTRY_URI": store}
