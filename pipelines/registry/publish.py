"""The model registry: a checkpoint logged as a pyfunc model, registered, described, and the alias gated.

    evaluated_scores(params, stage, checkpoint)   the evaluate stage's full-resolution scores of it
    register(params, stage, checkpoint, scores)   log, register, describe, move the alias if better -> record

The checkpoint is logged (pipelines/serve/pyfunc_model.py as the model's code, a copy of
fcn_models as its code path, model.pt + meta.json and the same network as ONNX as
artifacts) into the MLflow run that trained it, named in its meta.json: MLflow 3
makes that a LoggedModel whose source run is the training run, and the registered
version's run is the training run. It is logged by run id, not by reopening the run:
the training run keeps its status and end time whatever happens to register. The
version and the LoggedModel carry the weights' sha256 (stage_runs.WEIGHTS_TAG), which
the training run recorded when it ended, and evaluate's scores (linked to the
LoggedModel, at the checkpoint's iteration). A checkpoint without a training run in
this store gets a run of its own, register-<stage>, holding its scores the same way
and its network as params in the training runs' key scheme. The experiment, the
registered model and the version get descriptions (pipelines/registry/modelcard.py); the
version's, its model card, is also model_card.md in the run's and the model's
artifacts. The alias moves to the new
version only if its mean IU beats the one tagged on the version holding the alias
now (a tie keeps the champion; with no champion the new version takes it).

The signature declares the output only, an (H, W) uint8 mask. An input signature
would make MLflow's scoring server cast the JSON it gets to the declared dtype before
the model sees it: float pixels 0.5 become uint8 0, a black image and an
all-background mask. Without one the model sees what was sent and checks it itself
(serving.check_image: one image, 3 channels, integer pixels 0..255), for Python
callers and the server alike. The input example (a val image) shows the format.
"""
from __future__ import annotations

import json
import math
import pickle
import shutil
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path

import numpy as np

import fcn_models
from fcn_models import limits
from fcn_models.checkpoint import META_FILE, MODEL_FILE, read_meta
from fcn_models.errors import FCNError
from fcn_models.metrics import MEAN_IU, SCORE_KEYS
from pipelines.core.errors import StageError
from pipelines.core.files import file_sha256
from pipelines.core.params import Params
from pipelines.data.shards import decode_sample, iter_rows, shard_files
from pipelines.registry import modelcard
from pipelines.serve import pyfunc_model
from pipelines.serve.onnx_export import ExportError, export_onnx
from pipelines.serve.pyfunc_model import (
    CHECKPOINT_ARTIFACT,
    ONNX_ARTIFACT,
    FCNSegmenter,
)
from pipelines.track import metrics_log, provenance, stage_runs, store
from pipelines.track.val_scores import expected_network

SERVING_CODE = Path(pyfunc_model.__file__).resolve()
FCN_MODELS_DIR = Path(fcn_models.__file__).resolve().parent
MEAN_IU_TAG = MEAN_IU  # a version's tag of its evaluated mean IU
WEIGHTS_TAG = stage_runs.WEIGHTS_TAG
ONNX_FILE = "model.onnx"
CARD_FILE = "model_card.md"
# The input example is a val image's centre, at most this many pixels a side:
# it is stored as JSON with the model, twice.
EXAMPLE_MAX_SIDE = 64
# What the logged model needs besides mlflow (which MLflow adds itself).
REQUIREMENTS = ("torch", "torchvision", "numpy")


class RegisterError(FCNError, RuntimeError):
    """The stage cannot register as configured; the message says what to do."""


def evaluated_scores(params: Params, stage: str, checkpoint: Path, remake: str | None = None) -> dict:
    """The evaluate stage's scores of this checkpoint (evaluate.report_file) under report key
    `stage`, checked: they must be of these very weights, and the mean IU a finite number.
    remake: how to make the checkpoint, for the message when there is none."""
    try:
        read_meta(checkpoint, **expected_network(stage))
    except (FileNotFoundError, ValueError, StageError) as err:
        remake = remake or f"train that stage first (`fcn train --stage {checkpoint.name}`) or set mlflow.register_stage"
        raise RegisterError(f"{err}; {remake}") from None
    report_file = Path(params.evaluate.report_file)
    again = "run `fcn evaluate` (or `dvc repro evaluate`) first"
    try:
        report = json.loads(report_file.read_text())
    except FileNotFoundError:
        raise RegisterError(f"{report_file}: no evaluation report; {again}") from None
    except json.JSONDecodeError as err:
        raise RegisterError(f"{report_file} is not valid JSON ({err}); {again}") from None
    entry = report.get(stage) if isinstance(report, dict) else None
    if not isinstance(entry, dict) or any(not isinstance(entry.get(k), (int, float)) for k in SCORE_KEYS):
        raise RegisterError(f"{report_file} has no scores of stage {stage} ({', '.join(SCORE_KEYS)}); {again}")
    weights = file_sha256(checkpoint / MODEL_FILE)
    if entry.get("weights_sha256") != weights:
        raise RegisterError(f"{report_file} scored other weights for {stage} than {checkpoint / MODEL_FILE} "
                            f"(sha256 {entry.get('weights_sha256')} vs {weights}); {again}")
    if not math.isfinite(entry["mean_iu"]):
        raise RegisterError(f"{report_file}: mean_iu of {stage} is {entry['mean_iu']}, not a number to compare")
    return {k: float(entry[k]) for k in SCORE_KEYS}


def example_image(shards_dir: Path, max_side: int = EXAMPLE_MAX_SIDE) -> np.ndarray:
    """The val image with the fewest pixels (ties: the smallest id), its centre cut to at most max_side a side."""
    files = shard_files(shards_dir, "val")
    best = None  # ((pixels, id), shard)
    for path, (image_id, height, width) in iter_rows(files, ("id", "height", "width")):
        key = (height * width, image_id)
        if best is None or key < best[0]:
            best = (key, path)
    if best is None:
        raise RegisterError(f"{files[0].parent}: the val shards hold no image")
    (_, wanted), path = best
    image = next(decode_sample(i, img, lbl)[0] for _, (i, img, lbl) in iter_rows([path]) if i == wanted)
    height, width = image.shape[:2]
    cut_h, cut_w = min(height, max_side), min(width, max_side)
    top, left = (height - cut_h) // 2, (width - cut_w) // 2
    return np.ascontiguousarray(image[top:top + cut_h, left:left + cut_w])


def model_signature():
    """The output only (the module docstring says why)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1))]))


def requirements() -> list[str]:
    # Local version labels (2.x+cpu) are dropped: the same model serves on a CUDA build.
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in REQUIREMENTS]


def current_champion(client, name: str, alias: str) -> dict | None:
    """{"version", "mean_iu"} of the version holding the alias, read from its tag; None if none holds it."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if alias not in model.aliases:
        return None
    holder = client.get_model_version(name, str(model.aliases[alias]))
    tag = holder.tags.get(MEAN_IU_TAG)
    try:
        mean_iu = float(tag)
    except (TypeError, ValueError):
        mean_iu = math.nan
    if not math.isfinite(mean_iu):
        raise RegisterError(
            f"version {holder.version} of registered model {name!r} holds alias {alias!r} but its tag "
            f"{MEAN_IU_TAG!r} is {tag!r}, not a mean IU to compare with: set the tag to its val mean IU "
            f"(MlflowClient().set_model_version_tag) or remove the alias (delete_registered_model_alias)"
        )
    return {"version": int(holder.version), "mean_iu": mean_iu}


def _training_run(client, meta: dict):
    """The checkpoint's training run in this store, or None."""
    from mlflow.exceptions import MlflowException

    run_id = meta.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _lineage(client, run) -> list[dict]:
    """The runs the given one descends from (parent run tags), nearest first."""
    from mlflow.exceptions import MlflowException

    chain, seen = [], {run.info.run_id}
    parent = run.data.tags.get(stage_runs.PARENT_RUN_TAG)
    while parent and parent not in seen:
        seen.add(parent)
        try:
            run = client.get_run(parent)
        except MlflowException:
            break
        chain.append({"stage": run.data.tags.get(stage_runs.STAGE_TAG, "?"), "name": run.info.run_name,
                      "id": run.info.run_id})
        parent = run.data.tags.get(stage_runs.PARENT_RUN_TAG)
    return chain


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def network_params(meta: dict) -> dict[str, str]:
    """The checkpoint's network in the training runs' param keys (model.*)."""
    norm = meta["input_norm"]["name"] if isinstance(meta.get("input_norm"), dict) else meta.get("input_norm")
    return {"model.backbone": str(meta["backbone"]), "model.width": str(meta["width"]),
            "model.num_classes": str(meta["num_classes"]), "model.input_norm": str(norm)}


def register(params: Params, stage: str, checkpoint: Path, scores: dict, root: Path) -> dict:
    """Log, register, describe and gate the alias; return the record (what the registry file holds).
    RegisterError when the store refuses any of it."""
    from mlflow.exceptions import MlflowException

    try:
        return _register(params, stage, checkpoint, scores, root)
    except MlflowException as err:
        raise RegisterError(str(err)) from None


def _register(params: Params, stage: str, checkpoint: Path, scores: dict, root: Path) -> dict:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag
    from mlflow.models import Model
    from mlflow.tracking.context.registry import resolve_tags

    root = Path(root).resolve()
    config = params.mlflow
    example = example_image(Path(params.data.shards_dir))
    # Load and run it here: MLflow only warns when its own check of the input example fails.
    try:
        segmenter = FCNSegmenter().load(checkpoint, device="cpu")
        segmenter.segment(example)
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError) as err:
        raise RegisterError(f"{checkpoint}: cannot load and run the checkpoint: {err}") from None
    meta = segmenter.meta
    evaluation = json.loads(Path(params.evaluate.report_file).read_text())
    step = int(meta.get("iterations") or 0)

    experiment_id = store.set_up(params)
    client = MlflowClient()
    client.set_experiment_tag(experiment_id, stage_runs.NOTE_TAG, modelcard.experiment_description(params))
    champion = current_champion(client, config.model_name, config.alias)
    weights_sha256 = file_sha256(checkpoint / MODEL_FILE)
    trained_in = _training_run(client, meta)
    datasets = provenance.shard_datasets(Path(params.data.shards_dir))
    with tempfile.TemporaryDirectory(prefix="fcn-register-") as scratch:
        scratch = Path(scratch)
        # Only the weights and their description travel with the model, and the same network as ONNX.
        packed = scratch / "checkpoint"
        packed.mkdir()
        shutil.copy2(checkpoint / MODEL_FILE, packed / MODEL_FILE)
        # The served model refuses images above the limit it is registered with.
        (packed / META_FILE).write_text(json.dumps({**meta, limits.META_KEY: params.inference.max_pixels}, indent=2))
        try:
            onnx_file = export_onnx(packed, scratch / ONNX_FILE)
        except ExportError as err:
            raise RegisterError(str(err)) from None
        if trained_in is not None:
            run_id, own_run = trained_in.info.run_id, False
            shards_md5 = trained_in.data.tags.get(provenance.SHARDS_HASH_TAG)
        else:
            # The context tags (user, source, git commit) mlflow.start_run would give it.
            run_id = client.create_run(experiment_id, run_name=f"register-{stage}",
                                       tags=resolve_tags()).info.run_id
            own_run, shards_md5 = True, None
        # Logged by run id, never through mlflow.start_run: reopening the finished training run
        # would mark it RUNNING meanwhile (a sweep then blames its gone training driver, a kill
        # leaves it so) and FAILED on any error or Ctrl-C. The training run stays as it was.
        try:
            if own_run:
                # No training run to carry the scores: this run holds them, as evaluate logs them,
                # its network as the training runs' params, and its shards as inputs.
                client.log_batch(run_id, metrics=metrics_log.evaluation_metrics(evaluation[stage], step),
                                 params=[Param(k, v) for k, v in network_params(meta).items()],
                                 tags=[RunTag(stage_runs.STAGE_TAG, stage),
                                       RunTag(stage_runs.INIT_TAG, str(meta.get("init", "unknown")))])
                provenance.log_shard_inputs(client, run_id, datasets)
            client.set_tag(run_id, WEIGHTS_TAG, weights_sha256)
            # Model.log is what mlflow.pyfunc.log_model calls, the one that takes the run's id. It puts
            # the LoggedModel in the current experiment, "Default" unless one is set.
            mlflow.set_experiment(experiment_id=experiment_id)
            info = Model.log(
                artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id, python_model=str(SERVING_CODE),
                code_paths=[str(FCN_MODELS_DIR)],
                artifacts={CHECKPOINT_ARTIFACT: str(packed), ONNX_ARTIFACT: str(onnx_file)},
                signature=model_signature(), input_example=example, pip_requirements=requirements(),
                params=network_params(meta), tags={WEIGHTS_TAG: weights_sha256, "stage": stage},
            )
            # Evaluate's scores of these weights, linked to the logged model too.
            client.log_batch(run_id, metrics=metrics_log.evaluation_metrics(evaluation[stage], step, info.model_id))
        except BaseException as err:
            if own_run:
                client.set_terminated(run_id, status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        if own_run:
            client.set_terminated(run_id, status="FINISHED")
        run = client.get_run(run_id)
    if shards_md5 is None:
        shards_md5, _ = provenance.shards_hash(Path(params.data.shards_dir), root)
    # The tags come with the version, so the alias gate never sees a version without its score.
    version = mlflow.register_model(info.model_uri, config.model_name, tags={
        MEAN_IU_TAG: repr(scores["mean_iu"]), "stage": stage, WEIGHTS_TAG: weights_sha256,
    })
    card = modelcard.version_card({
        "model_name": config.model_name, "version": version.version, "stage": stage, "meta": meta,
        "weights_sha256": weights_sha256, "run": {"name": run.info.run_name, "id": run_id},
        "lineage": _lineage(client, run), "datasets": datasets, "shards_md5": shards_md5,
        "origin": modelcard.data_origin(params), "evaluation": evaluation,
        "onnx": f"artifacts/{ONNX_FILE}",
    })
    client.update_registered_model(config.model_name, description=modelcard.model_description(
        config.model_name, config.alias))
    client.update_model_version(config.model_name, version.version, description=card)
    with tempfile.TemporaryDirectory(prefix="fcn-card-") as scratch:
        card_file = Path(scratch) / CARD_FILE
        card_file.write_text(card)
        client.log_artifact(run_id, str(card_file))
        client.log_model_artifact(info.model_id, str(card_file))
    new = {"version": int(version.version), "mean_iu": scores["mean_iu"]}
    promote = champion is None or new["mean_iu"] > champion["mean_iu"]
    if promote:
        client.set_registered_model_alias(config.model_name, config.alias, str(new["version"]))
    after = new if promote else champion
    return {
        "model_name": config.model_name,
        "alias": config.alias,
        "decision": "promoted" if promote else "kept",
        "new_version": new["version"],
        "new_mean_iu": new["mean_iu"],
        "champion_version_before": champion["version"] if champion else None,
        "champion_mean_iu_before": champion["mean_iu"] if champion else None,
        "champion_version": after["version"],
        "champion_mean_iu": after["mean_iu"],
        "stage": stage,
        "checkpoint": _relative(checkpoint, root),
        "run_id": run_id,
        "model_id": info.model_id,
        "weights_sha256": weights_sha256,
        "model_uri": f"models:/{config.model_name}/{new['version']}",
    }
