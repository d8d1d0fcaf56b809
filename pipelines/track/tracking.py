"""MLflow: where runs and models go, and what a training stage records.

With no server named (mlflow.tracking_uri null and no MLFLOW_TRACKING_URI), the
store is SQLite at <project>/mlflow.db with artifacts under <project>/mlartifacts,
both absolute, so a process started elsewhere (a Ray job in a copied working
directory, a Ray Train worker) writes to the same place as `dvc repro`.

Every training stage is one MLflow run in the pipeline's experiment (mlflow.experiment):

    open_stage_run(...)   driver, before training: finds the run tagged with the Ray
                          run name (fcn.ray_run) or creates it; logs the stage's
                          params and its tags (stage, where the weights started, git
                          commit, DVC hash of the shards)
    MetricsLog            Ray Train rank 0, while training: each validation row (loss
                          and the four scores, step = iteration) and the training loss
    finish_stage_run(...) driver, after the outputs are written: any validation row
                          still missing (from the history it is handed), the plots and a
                          few val images (pipelines.track.figures), the outputs; FINISHED
    end_stage_run(...)    driver, when the stage fails: FAILED (KILLED on Ctrl-C)
    sweep_lost_runs(...)  every stage start and `fcn status`: a RUNNING run whose
                          driver is gone (killed, or its machine rebooted) is marked
                          FAILED, with a note saying so and how to resume it
    log_evaluation(...)   the evaluate stage: full-resolution scores on the stage's run

Lineage: a stage that starts from an earlier stage's checkpoint is nested under the
run that trained those weights (MLflow's parent run), so the UI shows FCN-32s >
FCN-16s > FCN-8s as one tree: the pipeline's runs grouped by what each one was
trained from, not by the `dvc repro` that ran it. DVC re-runs only what changed, so
one invocation may train FCN-16s and FCN-8s on top of an FCN-32s from an earlier
one; an invocation parent would split that chain or hold runs it never trained. Each
run records its train and val shards as dataset inputs (name, DVC md5 of the split's
directory, rows per source) and, once trained, the sha256 of its best weights
(WEIGHTS_TAG), which the registered version carries too.

A stage resumed under the same Ray run name (after a worker failure, or run again
for more iterations) continues the same MLflow run; a new Ray run name (changed
params) is a new MLflow run; its params are pipelines.train.recipe's RESULT_PARAMS, the
same list that names the Ray run and that dvc.yaml re-runs the stage on, with the
stage's own entry as stage.* and stage.init what the weights really started from
(random when ImageNet weights were asked for but absent). Artifacts: plots/confusion_matrix.png and
plots/per_class_iu.png of the best checkpoint, val_images/<id>.png (image | its
prediction | the truth, in the VOC colours) for the first mlflow.val_images_logged
val images, outputs/metrics.json and outputs/history.csv.

The shards' hash is the md5 DVC gives data.shards_dir: read from dvc.lock while the
lock's file count and size still match the shard files, else computed with DVC's own
library (dvc_data), as `dvc add` would. Only the contract's files count (each split's
pipelines.data.shards.FILE_PATTERN), what preprocess leaves: a temp folder a killed
preprocess left beside them is not data any run reads, and must not change the hash.

Every stage run is tagged with its driver (fcn.driver.host, .pid, .started:
pipelines.core.driver.identity()); the sweep marks a run lost only when that driver ran
on this host and no longer runs, so a run trained elsewhere is never touched.

Outages: the driver fails the stage before training when the store cannot be
opened, since a stage nobody can find in MLflow is not what anyone asked for. Once
training runs, a logging error on rank 0 is reported and logging stops for that
attempt, but training goes on: every validation row is also in the checkpoint's
history, and the driver logs the missing ones when the stage ends (an error there
fails the stage).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fcn_models.errors import FCNError
from fcn_models.metrics import SCORE_KEYS
from pipelines.core import driver
from pipelines.core.files import file_sha256
from pipelines.core.params import Params
from pipelines.data.shards import COLUMNS, SPLITS, ShardError, iter_rows, shard_files
from pipelines.track import figures

RAY_RUN_TAG = "fcn.ray_run"
RAY_STORAGE_TAG = "fcn.ray_storage"
STAGE_TAG = "fcn.stage"
INIT_TAG = "fcn.init"
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own key: its UI shows it with the run
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the run under its parent
NOTE_TAG = "mlflow.note.content"  # MLflow's own: the description of a run or experiment
# MLflow 3's UI opens an experiment of no kind as a GenAI one (traces); this kind opens its runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# The sha256 of a checkpoint's model.pt: on the run that trained it and on its registered version.
WEIGHTS_TAG = "weights_sha256"
# What a training run logs its shards as, per split: the dataset's name and its context.
DATASET_CONTEXT = {"train": "training", "val": "validation"}
GIT_DIRTY_TAG = "fcn.git_dirty"
SHARDS_HASH_TAG = "fcn.shards_md5"
SHARDS_HASH_SOURCE_TAG = "fcn.shards_md5_from"
# MLflow params are write-once: a resumed run whose params moved (more iterations)
# keeps the first value as the param and the current one as this tag + the key.
CHANGED_PARAM_TAG = "fcn.param."
# The training loss every train.log_every iterations, beside the validation rows' `loss`
# (the mean training loss since the previous validation, as history.csv has it).
TRAIN_LOSS_KEY = "train_loss"
# Evaluate's full-resolution scores on a stage's run: eval/<score> and eval/iu/<class>.
EVAL_PREFIX = "eval/"
# The driver training the run: fcn.driver.host, fcn.driver.pid, fcn.driver.started.
DRIVER_TAG = "fcn.driver."
DRIVER_KEYS = ("host", "pid", "started")


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


# ---------------------------------------------------------------------------
# Where a stage's inputs come from: the code's git commit, the shards' DVC hash.


def git_state(root: Path) -> tuple[str, bool | None]:
    """(commit of HEAD, whether the tree has changes) for the project at root;
    ("unknown", None) outside a git repository or without git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        # No optional locks: reading the state must not rewrite the index.
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            return "unknown", None
        status = git("status", "--porcelain")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return head.stdout.strip(), dirty


def _contract_files(shards_dir: Path, split: str | None = None) -> list[Path]:
    """The shards of `split` (None: every split), the files DVC holds when preprocess ended
    cleanly; a temp folder a killed preprocess left beside them is not among them."""
    files = []
    for name in SPLITS if split is None else (split,):
        try:
            files += shard_files(Path(shards_dir), name)
        except ShardError:
            pass  # a missing split: the stage fails on it with its own message
    return files


def _files_size(shards_dir: Path) -> tuple[int, int]:
    files = _contract_files(shards_dir)
    return len(files), sum(p.stat().st_size for p in files)


def _locked_hash(shards_dir: Path, root: Path) -> str | None:
    """The md5 dvc.lock records for shards_dir, if it still describes the shards.

    DVC wrote it when the stage that makes the shards last ran; a count or size of
    shard files that no longer matches means the shards changed outside DVC since.
    """
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    except yaml.YAMLError:
        return None
    for stage in stages.values():
        for out in (stage or {}).get("outs") or []:
            if not isinstance(out, dict) or "path" not in out:
                continue
            if (Path(root) / out["path"]).resolve() != shards_dir.resolve():
                continue
            md5 = str(out.get("md5") or "")
            if md5.endswith(".dir") and (out.get("nfiles"), out.get("size")) == _files_size(shards_dir):
                return md5
    return None


def compute_shards_hash(shards_dir: Path, split: str | None = None) -> str:
    """The md5 DVC gives the shards directory (split None) or one split's directory (ends
    with ".dir"), computed with DVC's own library over the contract's shard files only:
    the same value while the directory holds nothing else, as preprocess leaves it."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_data.hashfile.tree import Tree
    from dvc_objects.fs import LocalFileSystem, MemoryFileSystem

    base = (Path(shards_dir) if split is None else Path(shards_dir) / split).resolve()
    # build() stages objects in a database; a throwaway in-memory one keeps nothing.
    staging, fs, tree = HashFileDB(MemoryFileSystem(), "memory://fcn-shards-hash"), LocalFileSystem(), Tree()
    for path in _contract_files(shards_dir, split):
        _, meta, obj = build(staging, str(path.resolve()), fs, "md5", dry_run=True)
        tree.add(path.resolve().relative_to(base).parts, meta, obj.hash_info)
    tree.digest()
    return tree.hash_info.value


def shards_hash(shards_dir: Path, root: Path) -> tuple[str, str]:
    """(DVC md5 of the shards directory, where it came from: "dvc.lock" or "computed")."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise TrackingError(f"{shards_dir}: no shards directory to hash (run `fcn preprocess`, "
                            "or check data.shards_dir)")
    locked = _locked_hash(shards_dir, Path(root))
    if locked:
        return locked, "dvc.lock"
    return compute_shards_hash(shards_dir), "computed"


_MLFLOW_TYPES = {"string": "string", "binary": "binary", "int32": "integer"}


def shard_datasets(shards_dir: Path) -> list[dict]:
    """Per split, what the shards are as a dataset: {"name" (the split), "digest" (the md5 DVC gives
    the split's directory), "rows", "sources" ({"voc": n, "sbd": m}), "uri", "files"}."""
    out = []
    for split in SPLITS:
        files = shard_files(Path(shards_dir), split)
        sources: dict[str, int] = {}
        for _, (source,) in iter_rows(files, ("source",)):
            sources[source] = sources.get(source, 0) + 1
        out.append({"name": split, "digest": compute_shards_hash(shards_dir, split), "rows": sum(sources.values()),
                    "sources": dict(sorted(sources.items())), "uri": files[0].parent.resolve().as_uri(),
                    "files": len(files)})
    return out


def log_shard_inputs(client, run_id: str, datasets: list[dict]) -> None:
    """The shards' splits as the run's dataset inputs (MLflow's log_input, through the client)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    schema = json.dumps({"mlflow_colspec": [{"type": _MLFLOW_TYPES[kind], "name": name, "required": True}
                                            for name, kind in COLUMNS]})
    inputs = [DatasetInput(
        Dataset(name=d["name"], digest=d["digest"], source_type="local", source=json.dumps({"uri": d["uri"]}),
                schema=schema, profile=json.dumps({"num_rows": d["rows"], "rows_by_source": d["sources"],
                                                   "num_files": d["files"]})),
        tags=[InputTag("mlflow.data.context", DATASET_CONTEXT[d["name"]])]) for d in datasets]
    client.log_inputs(run_id, datasets=inputs)


def upstream_run(init: dict) -> str | None:
    """The MLflow run that trained a stage's starting weights (from its checkpoint's meta.json), or None."""
    if init.get("source") in ("imagenet", "random") or not init.get("path"):
        return None
    try:
        return json.loads((Path(init["path"]) / "meta.json").read_text()).get("mlflow_run_id")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# The driver's side: open the stage's run before training, close it after.


@dataclasses.dataclass(frozen=True)
class StageRun:
    """The MLflow run of a stage; `for_workers()` is what rank 0 needs to log to it."""
    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool

    def for_workers(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

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


def open_stage_run(params: Params, stage: str, root: Path, ray_run: str, storage: str, init: dict,
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
    tags = {STAGE_TAG: stage, RAY_RUN_TAG: ray_run, RAY_STORAGE_TAG: storage, INIT_TAG: init["note"],
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


def logged_steps(client, run_id: str, key: str) -> set[int]:
    return {m.step for m in client.get_metric_history(run_id, key)}


def log_missing_rows(client, run_id: str, rows: list[dict]) -> int:
    """Log each row's metrics (every key but "iteration", step = iteration) not yet in the run;
    return how many metric values were logged. A step already there is left as it is."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    keys = sorted({k for row in rows for k in row if k != "iteration"})
    missing = []
    for key in keys:
        have = logged_steps(client, run_id, key)
        missing += [Metric(key, float(row[key]), now, int(row["iteration"]))
                    for row in rows if key in row and int(row["iteration"]) not in have]
    # log_batch takes at most 1000 metrics a call.
    for i in range(0, len(missing), 1000):
        client.log_batch(run_id, metrics=missing[i:i + 1000])
    return len(missing)


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
    client.set_tag(run_id, WEIGHTS_TAG, file_sha256(Path(models_dir) / "model.pt"))
    client.set_terminated(run_id, status="FINISHED")


def end_stage_run(stage_run: StageRun, status: str = "FAILED") -> None:
    """Mark the run ended (FAILED, KILLED); an error doing so is reported, not raised,
    so it cannot hide the one that ended the stage."""
    try:
        stage_run.client().set_terminated(stage_run.run_id, status=status)
    except Exception as err:
        print(f"MLflow: could not mark run {stage_run.run_id} {status}: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Rank 0's side: metrics while training.


class MetricsLog:
    """What rank 0 logs to the stage's run while training; does nothing on other ranks,
    or without a run (tracking None).

    After the first logging error it stops for this attempt (reported on stderr):
    training goes on, and the driver logs the validation rows still missing at the end.
    """

    def __init__(self, tracking: dict | None, rank: int, stage: str):
        self.client, self.run_id, self.stage = None, None, stage
        self.validated: set[int] = set()
        self.train_loss_after = 0
        if not tracking or rank != 0:
            return
        uri = tracking["tracking_uri"]
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            # The driver created it: absent means this worker runs on another node.
            self._give_up(f"the tracking store {uri} is not on this node (use a tracking server "
                          "on a multi-node cluster)")
            return
        self._call(lambda: self._connect(tracking))

    def _connect(self, tracking: dict) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri=tracking["tracking_uri"]), tracking["run_id"]

    def _give_up(self, why: str) -> None:
        self.client = None
        sys.stderr.write(f"[{self.stage}] WARNING: MLflow logging stops for this attempt: {why}; "
                         "the stage logs its validation rows when it ends\n")
        sys.stderr.flush()

    def _call(self, action) -> None:
        try:
            action()
        except Exception as err:
            self._give_up(f"{type(err).__name__}: {err}")

    def resume(self, history: list[dict]) -> None:
        """At the start of an attempt: log the rows of the checkpoint's history not yet in
        the run, and note what an earlier attempt logged, so redone steps are not logged twice."""
        def sync():
            log_missing_rows(self.client, self.run_id, history)
            self.validated = logged_steps(self.client, self.run_id, "loss")
            self.train_loss_after = max(logged_steps(self.client, self.run_id, TRAIN_LOSS_KEY), default=0)
        if self.client:
            self._call(sync)

    def validation(self, row: dict) -> None:
        """Log a validation row (every key but "iteration") once its checkpoint is reported."""
        from mlflow.entities import Metric

        step = int(row["iteration"])
        if self.client and step not in self.validated:
            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, step) for k, v in row.items() if k != "iteration"]
            self._call(lambda: self.client.log_batch(self.run_id, metrics=metrics))
            self.validated.add(step)

    def train_loss(self, iteration: int, value: float) -> None:
        from mlflow.entities import Metric

        if self.client and iteration > self.train_loss_after:
            metric = Metric(TRAIN_LOSS_KEY, float(value), int(time.time() * 1000), iteration)
            self._call(lambda: self.client.log_batch(self.run_id, metrics=[metric]))


# ---------------------------------------------------------------------------
# The evaluate stage's scores, on the run that trained the checkpoint.


def log_evaluation(params: Params, run_id: str, entry: dict, step: int = 0) -> bool:
    """Log an evaluate entry (the four scores, per-class IU by name) to the training run
    `run_id` as eval/<score> and eval/iu/<class>, at `step` (the checkpoint's iteration, so
    the full-resolution scores sit on the run's validation curve where those weights were
    taken); False (with a line saying why) when the store has no such run, e.g. a
    checkpoint trained against another store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        print(f"[evaluate] no MLflow store at {uri}: the scores of run {run_id} are in the report file only",
              flush=True)
        return False
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        print(f"[evaluate] MLflow run {run_id} is not in {tracking_uri(params)}: its scores are in the "
              "report file only", flush=True)
        return False
    client.log_batch(run_id, metrics=evaluation_metrics(entry, step))
    return True


def evaluation_metrics(entry: dict, step: int, model_id: str | None = None) -> list:
    """An evaluate entry as eval/<score> and eval/iu/<class> metrics at `step` (of a logged model, if given)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {f"{EVAL_PREFIX}{k}": entry[k] for k in SCORE_KEYS}
    values.update({f"{EVAL_PREFIX}iu/{name}": iu for name, iu in (entry.get("per_class_iu") or {}).items()})
    return [Metric(_metric_key(k), float(v), now, int(step), model_id=model_id)
            for k, v in values.items() if v is not None]


def _metric_key(key: str) -> str:
    # MLflow keys take letters, digits, _ - . / and spaces only.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)
