"""MLflow: where runs and models go.

With no server named (mlflow.tracking_uri null and no MLFLOW_TRACKING_URI), the
store is SQLite at <project>/mlflow.db with artifacts under <project>/mlartifacts,
both absolute, so a process started elsewhere (a Ray job in a copied working
directory, a Ray Train worker) writes to the same place as `dvc repro`.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipelines.params import Params, resolve


def tracking_uri(params: Params, root: Path) -> str:
    """params' mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else the project's SQLite store."""
    if params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str(resolve(params.mlflow.db_file, Path(root).resolve()))


def artifact_location(params: Params, root: Path) -> str:
    """The experiment's artifact root for a local store (a file:// URI, absolute)."""
    return resolve(params.mlflow.artifacts_dir, Path(root).resolve()).as_uri()


def set_up(params: Params, root: Path) -> str:
    """Point mlflow at the store and make sure the experiment exists; return its id."""
    import mlflow

    uri = tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    # Registry calls go to the same store.
    mlflow.set_registry_uri(uri)
    name = params.mlflow.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A server decides where artifacts go; a local store keeps them in the project.
    location = artifact_location(params, root) if uri.startswith("sqlite:") else None
    return mlflow.create_experiment(name, artifact_location=location)
