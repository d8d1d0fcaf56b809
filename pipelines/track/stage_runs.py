"""A training stage's MLflow run, from its start to its end, and the sweep of runs whose driver is gone.

    open_stage_run(...)   driver, before training: finds the run tagged with the Ray
                          run name (fcn.ray_run) or creates it; logs the stage's
                          params and its tags (stage, where the weights started, git
                          commit, DVC hash of the shards: pipelines.track.provenance)
    finish_stage_run(...) driver, after the outputs are written: any validation row
                          still missing (from the history it is handed), the plots and a
                          few val images (pipelines.track.figures), the outputs; FINISHED
    end_stage_run(...)    driver, when the stage fails: FAILED (KILLED on Ctrl-C)
    sweep_lost_runs(...)  every stage start and `fcn status`: a RUNNING run whose
                          driver is gone (killed, or its machine rebooted) is marked
                          FAILED, with a note saying so and how to resume it

While training, rank 0 logs to the run through pipelines.track.metrics_log.

Lineage: a stage that starts from an earlier stage's checkpoint is nested under the
run that trained those weights (MLflow's parent run), so the UI shows FCN-32s >
FCN-16s > FCN-8s as one tree: the pipeline's runs grouped by what each one was
trained from, not by the `dvc repro` that ran it. DVC re-runs only what changed, so
one invocation may train FCN-16s and FCN-8s on top of an FCN-32s from an earlier
one; an invocation parent would split that chain or hold runs it never trained. Each
run records its train and val shards as dataset inputs and, once trained, the sha256
of its best weights (WEIGHTS_TAG), which the registered version carries too.

A stage resumed under the same Ray run name (after a worker failure, or run again
for more iterations) continues the same MLflow run; a new Ray run name (changed
params) is a new MLflow run; its params are pipelines.train.recipe's RESULT_PARAMS, the
same list that names the Ray run and that dvc.yaml re-runs the stage on, with the
stage's own entry as stage.* and stage.init what the weights really started from
(random when ImageNet weights were asked for but absent). Artifacts: plots/confusion_matrix.png and
plots/per_class_iu.png of the best checkpoint, val_images/<id>.png (image | its
prediction | the truth, in the VOC colours) for the first mlflow.val_images_logged
val images, outputs/metrics.json and outputs/history.csv.

Every stage run is tagged with its driver (fcn.driver.host, .pid, .started:
pipelines.core.driver.identity()); the sweep marks a run lost only when that driver ran
on this host and no longer runs, so a run trained elsewhere is never touched.

Outages: the driver fails the stage before training when the store cannot be
opened, since a stage nobody can find in MLflow is not what anyone asked for. Once
training runs, a logging error on rank 0 stops its logging but not training
(pipelines.track.metrics_log), and the driver logs the missing validation rows when
the stage ends (an error there fails the stage).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol

from fcn_models.checkpoint import META_FILE, MODEL_FILE
from pipelines.core import driver
from pipelines.core.files import file_sha256
from pipelines.core.params import Params
from pipelines.data.shards import ShardError
from pipelines.track import figures
from pipelines.track.metrics_log import RunTarget, log_missing_rows
from pipelines.track.provenance import (
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    SHARDS_HASH_SOURCE_TAG,
    SHARDS_HASH_TAG,
    git_state,
    log_shard_inputs,
    shard_datasets,
    shards_hash,
)
from pipelines.track.store import TrackingError, set_up, tracking_uri, use_store

RAY_RUN_TAG = "fcn.ray_run"
RAY_STORAGE_TAG = "fcn.ray_storage"
STAGE_TAG = "fcn.stage"
INIT_TAG = "fcn.init"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the run under its parent
NOTE_TAG = "mlflow.note.content"  # MLflow's own: the description of a run or experiment
# The sha256 of a checkpoint's model.pt: on the run that trained it and on its registered version.
WEIGHTS_TAG = "weights_sha256"
# MLflow params are write-once: a resumed run whose params moved (more iterations)
# keeps the first value as the param and the current one as this tag + the key.
CHANGED_PARAM_TAG = "fcn.param."
# The driver training the run: fcn.driver.host, fcn.driver.pid, fcn.driver.started.
DRIVER_TAG = "fcn.driver."
DRIVER_KEYS = ("host", "pid", "started")


class WeightsStart(Protocol):
    """Where a stage's weights start, as pipelines.train.recipe.StageInit says it."""
    source: str
    path: str | None
    note: str


def upstream_run(init: WeightsStart) -> str | None:
    """The MLflow run that trained a stage's starting weights (from its checkpoint's meta.json), or None."""
    if init.source in ("imagenet", "random") or not init.path:
        return None
    try:
        return json.loads((Path(init.path) / META_FILE).read_text()).get("mlflow_run_id")
    except (OSError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class StageRun:
    """The MLflow run of a stage; `for_workers()` is what rank 0 needs to log to it."""
    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool

    def for_workers(self) -> RunTarget:
        return RunTarget(self.tracking_uri, self.run_id)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)


def _filter_value(value: str) -> str:
    """A quoted string for an MLflow search filter."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise TrackingError(f"run name {value!r}: cannot hold both ' and \" (MLflow cannot search for it); "
                        "choose another --run-name")


def _find_run(client, experiment_id: str, stage: str, ray_run: str, storage: str):
    """The earliest active run of this stage for this Ray run, or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RAY_RUN_TAG}` = {_filter_value(ray_run)}",
                              order_by=["attributes.start_time ASC"])
    runs = [r for r in runs if r.data.tags.get(RAY_STORAGE_TAG) == storage and r.data.tags.get(STAGE_TAG) == stage]
    return runs[0] if runs else None


def open_stage_run(params: Params, stage: str, root: Path, ray_run: str, storage: str, init: WeightsStart,
                   run_params: dict[str, str]) -> StageRun:
    """The stage's MLflow run, resumed (same Ray run in the same storage) or new, marked
    RUNNING, with the stage's params, tags and dataset inputs logged, nested under the run
    that trained its starting weights (init: recipe.resolve_init's); run_params are the params
    to log (recipe.stage_params). TrackingError when the
    store cannot be opened."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    root = Path(root).resolve()
    uri = tracking_uri(params)
    try:
        experiment_id = set_up(params)
        client = MlflowClient(tracking_uri=uri)
        for lost in _sweep(client, experiment_id):
            print(f"[{stage}] MLflow run {lost['run_id']} ({lost['stage']}) was left RUNNING by a driver that is "
                  f"gone ({lost['driver']}): marked FAILED", flush=True)
        run = _find_run(client, experiment_id, stage, ray_run, storage)
    except TrackingError:
        raise
    except Exception as err:  # any failure here means no tracking: the stage must not start
        raise TrackingError(
            f"cannot open the MLflow tracking store {uri}: {type(err).__name__}: {err}. Start the tracking "
            "server, or point mlflow.tracking_uri / MLFLOW_TRACKING_URI at a reachable one "
            "(both unset: the local SQLite store in the project)") from err

    commit, dirty = git_state(root)
    shards_md5, hash_from = shards_hash(Path(params.data.shards_dir), root)
    tags = {STAGE_TAG: stage, RAY_RUN_TAG: ray_run, RAY_STORAGE_TAG: storage, INIT_TAG: init.note,
            GIT_COMMIT_TAG: commit, SHARDS_HASH_TAG: shards_md5, SHARDS_HASH_SOURCE_TAG: hash_from,
            **{DRIVER_TAG + k: v for k, v in driver.identity().items()}}
    if dirty is not None:
        tags[GIT_DIRTY_TAG] = str(dirty).lower()
    parent = _existing_run(client, upstream_run(init), experiment_id)
    if parent:
        tags[PARENT_RUN_TAG] = parent
    wanted = run_params
    if run is None:
        run_name = ray_run if ray_run.startswith(stage) else f"{stage}-{ray_run}"
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={RAY_RUN_TAG: ray_run, RAY_STORAGE_TAG: storage, STAGE_TAG: stage})
        logged, resumed = {}, False
    else:
        client.update_run(run.info.run_id, status="RUNNING")
        logged, resumed = run.data.params, True
    run_id = run.info.run_id
    changed = {k: v for k, v in wanted.items() if k in logged and logged[k] != v}
    tags.update({CHANGED_PARAM_TAG + k: v for k, v in changed.items()})
    # log_batch takes at most 100 params a call.
    new_params = [Param(k, v) for k, v in wanted.items() if k not in logged]
    for i in range(0, len(new_params), 100):
        client.log_batch(run_id, params=new_params[i:i + 100])
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    try:
        datasets = shard_datasets(Path(params.data.shards_dir))
    except ShardError:
        datasets = []  # a split is missing: the stage fails on it with its own message, and ends this run
    if datasets:
        log_shard_inputs(client, run_id, datasets)
    print(f"[{stage}] MLflow run {run_id} ({'resumed' if resumed else 'new'}) in experiment "
          f"{params.mlflow.experiment!r} at {uri}", flush=True)
    if changed:
        print(f"[{stage}] MLflow run {run_id} resumed with changed params (tagged {CHANGED_PARAM_TAG}<key>): "
              + ", ".join(f"{k} {logged[k]} -> {v}" for k, v in changed.items()), flush=True)
    return StageRun(uri, experiment_id, run_id, resumed)


def run_driver(run) -> dict:
    """The driver recorded on an MLflow run (empty values when it has none)."""
    return {k: run.data.tags.get(DRIVER_TAG + k) for k in DRIVER_KEYS}


def _sweep(client, experiment_id: str) -> list[dict]:
    """Mark FAILED, with a note, every RUNNING run of the experiment whose driver is gone;
    return {"run_id", "stage", "driver"} of each."""
    lost = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        record = run_driver(run)
        if not driver.is_gone(record):
            continue
        stage = run.data.tags.get(STAGE_TAG, "?")
        note = (f"Marked FAILED by fcn on {time.strftime('%Y-%m-%d %H:%M:%S')}: its driver "
                f"({driver.describe(record)}) ended without closing this run (killed, or its machine went down). "
                f"`fcn train --stage {stage}` with the same parameters resumes it from its last checkpoint.")
        earlier = run.data.tags.get(NOTE_TAG)
        client.set_tag(run.info.run_id, NOTE_TAG, f"{earlier}\n\n{note}" if earlier else note)
        client.set_terminated(run.info.run_id, status="FAILED")
        lost.append({"run_id": run.info.run_id, "stage": stage, "driver": driver.describe(record)})
    return lost


def sweep_lost_runs(params: Params) -> list[dict]:
    """_sweep over the pipeline's experiment (none yet: nothing to do). TrackingError when
    the store cannot be opened."""
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    try:
        use_store(uri)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(params.mlflow.experiment)
        return [] if experiment is None else _sweep(client, experiment.experiment_id)
    except Exception as err:
        raise TrackingError(f"cannot open the MLflow tracking store {uri}: {type(err).__name__}: {err}") from err


def stage_runs(params: Params) -> list:
    """Every stage run of the pipeline's experiment, newest first (empty without the experiment)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(params))
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{STAGE_TAG}` != ''",
                              order_by=["attributes.start_time DESC"])


def _existing_run(client, run_id: str | None, experiment_id: str) -> str | None:
    """run_id if that run is in this store's experiment (a checkpoint may come from another store)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return run_id if client.get_run(run_id).info.experiment_id == experiment_id else None
    except MlflowException:
        return None


def finish_stage_run(stage_run: StageRun, params: Params, stage: str, models_dir: Path,
                     history: list[dict], outputs: dict[str, str]) -> None:
    """After the stage's outputs are written: log the validation rows of `history` that rank 0
    could not, the plots and val images of the best checkpoint, the output files
    ({name: text}) and the best weights' sha256; mark it FINISHED."""
    client = stage_run.client()
    run_id = stage_run.run_id
    caught_up = log_missing_rows(client, run_id, history)
    if caught_up:
        print(f"[{stage}] MLflow: logged {caught_up} metric values the training workers had not", flush=True)
    with tempfile.TemporaryDirectory(prefix="fcn-mlflow-") as scratch:
        scratch = Path(scratch)
        figures.stage_figures(Path(models_dir), Path(params.data.shards_dir), params.mlflow.val_images_logged,
                              scratch, stage)
        (scratch / "outputs").mkdir()
        for name, text in outputs.items():
            (scratch / "outputs" / name).write_text(text)
        client.log_artifacts(run_id, str(scratch))
    client.set_tag(run_id, WEIGHTS_TAG, file_sha256(Path(models_dir) / MODEL_FILE))
    client.set_terminated(run_id, status="FINISHED")


def end_stage_run(stage_run: StageRun, status: str = "FAILED") -> None:
    """Mark the run ended (FAILED, KILLED); an error doing so is reported, not raised,
    so it cannot hide the one that ended the stage."""
    try:
        stage_run.client().set_terminated(stage_run.run_id, status=status)
    except Exception as err:
        print(f"MLflow: could not mark run {stage_run.run_id} {status}: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)
