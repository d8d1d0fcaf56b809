"""The MLflow store: where runs and models go, and the pipeline's experiment in it.

With no server named (mlflow.tracking_uri null and no MLFLOW_TRACKING_URI), the
store is SQLite at <project>/mlflow.db with artifacts under <project>/mlartifacts,
both absolute, so a process started elsewhere (a Ray job in a copied working
directory, a Ray Train worker) writes to the same place as `dvc repro`.
"""
from __future__ import annotations

import os
from pathlib import Path

from fcn_models.errors import FCNError
from pipelines.core.params import Params

# MLflow 3's UI opens an experiment of no kind as a GenAI one (traces); this kind opens its runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


class TrackingError(FCNError, RuntimeError):
    """The tracking store cannot be used; the message names it and the fix."""


def tracking_uri(params: Params) -> str:
    """params' mlflow.tracking_uri, else MLFLOW_TRACKING_URI, else the project's SQLite store."""
    if params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        # Workers run elsewhere (another working directory): a relative SQLite path is taken
        # from where the variable was set, this process's directory.
        prefix = "sqlite:///"
        if uri.startswith(prefix) and uri[len(prefix):] and not Path(uri[len(prefix):]).is_absolute():
            return prefix + str(Path.cwd() / uri[len(prefix):])
        return uri
    return "sqlite:///" + str(Path(params.mlflow.db_file).absolute())


def artifact_location(params: Params) -> str:
    """The experiment's artifact root for a local store (a file:// URI, absolute)."""
    return Path(params.mlflow.artifacts_dir).absolute().as_uri()


def use_store(uri: str) -> None:
    """Send this process's mlflow tracking and registry calls to `uri`.

    mlflow also exports the URI to MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI; those are
    put back as they were, since tracking_uri() reads the variable as the user's choice:
    left set, one project's store would become every later project's in this process.
    """
    import mlflow

    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def set_up(params: Params) -> str:
    """Point mlflow at the store and make sure the experiment exists; return its id."""
    import mlflow

    uri = tracking_uri(params)
    use_store(uri)
    name = params.mlflow.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        # A server decides where artifacts go; a local store keeps them in the project.
        location = artifact_location(params) if uri.startswith("sqlite:") else None
        experiment_id = mlflow.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    else:
        experiment_id = experiment.experiment_id
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            mlflow.MlflowClient(tracking_uri=uri).set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG,
                                                                    EXPERIMENT_KIND)
    return experiment_id


def runs_view(base_url: str, experiment_id: str) -> str:
    """The UI's address of the experiment's runs (MLflow 3 opens the GenAI view without the parameter)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
