"""Where a model comes from: a checkpoint directory, or an MLflow model URI in the project's store.

    is_model_uri(text)                       "models:/...", "runs:/...", "s3://...": a URI for MLflow
    default_model_uri(params)                models:/<mlflow.model_name>@<mlflow.alias>, what commands
                                             use without --model
    open_store(params, uri)                  mlflow pointed at the params' store; an error naming
                                             the store, not a new empty one, when its SQLite file is absent
    check_model(uri, store)                  the URI names a model in the store (ModelSourceError otherwise)
    local_checkpoint(source, params, into)   the checkpoint directory (model.pt + meta.json): the
                                             directory itself, or for a URI the one inside the
                                             registered model, downloaded into `into`

`fcn predict` loads a URI as the pyfunc the registry logged; batch inference and the
ONNX export need the weights themselves, which travel inside that model as its
checkpoint artifact (pipelines.serve.pyfunc_model.CHECKPOINT_ARTIFACT).
"""
from __future__ import annotations

import re
from pathlib import Path

from fcn_models.errors import FCNError
from pipelines.core.params import Params
from pipelines.serve.pyfunc_model import CHECKPOINT_ARTIFACT
from pipelines.track.store import tracking_uri, use_store

# "models:/...", "runs:/...", "s3://...": a URI for MLflow; anything else is a checkpoint directory.
MODEL_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


class ModelSourceError(FCNError, RuntimeError):
    """A model that is not there; the message names it and says what to do."""


def is_model_uri(source: str) -> bool:
    return bool(MODEL_URI.match(str(source)))


def alias_uri(name: str, alias: str) -> str:
    """The URI of the version of registered model `name` that holds `alias`."""
    return f"models:/{name}@{alias}"


def default_model_uri(params: Params) -> str:
    return alias_uri(params.mlflow.model_name, params.mlflow.alias)


def missing_model_message(uri: str, err: Exception, store: str) -> str:
    """The message for MLflow failing to find or read the model at `uri`."""
    message = getattr(err, "message", str(err))
    return f"model {uri}: {message} (tracking store {store}; check the name and alias, or run `fcn register`)"


def open_store(params: Params, uri: str) -> str:
    """Point this process's mlflow at the params' tracking store; return the store's URI."""
    store = tracking_uri(params)
    if store.startswith("sqlite:///"):
        # Connecting would create an empty store; say instead that there is none.
        db = Path(store[len("sqlite:///"):])
        if not db.is_file():
            raise ModelSourceError(f"model {uri}: no MLflow store at {db} (run `fcn register` first, or point "
                                   "--params at the project that registered the model)")
    use_store(store)
    return store


def check_model(uri: str, store: str) -> None:
    """Fail now, with the model's name, rather than in a server's start-up log."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.models.get_model_info(uri)
    except (MlflowException, OSError) as err:
        raise ModelSourceError(missing_model_message(uri, err, store)) from None


def local_checkpoint(source: str, params: Params, into: Path) -> Path:
    """The checkpoint directory of a checkpoint directory or an MLflow model URI."""
    if not is_model_uri(source):
        directory = Path(source)
        if not directory.is_dir():
            raise ModelSourceError(f"model {source}: no such checkpoint directory (give a directory holding "
                                   "model.pt and meta.json, or a models:/<name>@<alias> URI)")
        return directory
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    store = open_store(params, source)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(into)))
        flavor = Model.load(str(local)).flavors.get("python_function", {})
    except (MlflowException, OSError) as err:
        raise ModelSourceError(missing_model_message(source, err, store)) from None
    artifact = (flavor.get("artifacts") or {}).get(CHECKPOINT_ARTIFACT) or {}
    directory = local / artifact["path"] if "path" in artifact else None
    if directory is None or not directory.is_dir():
        raise ModelSourceError(f"model {source}: holds no checkpoint artifact {CHECKPOINT_ARTIFACT!r} (not a "
                               "model the register stage logged)")
    return directory
