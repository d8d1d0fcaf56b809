"""`fcn seeds` in MLflow: a parent run over a stage's seeds, and a child run per seed naming its training run.

    open_seeds_run(params, stage, seeds, source)  the parent `seeds-<stage>` in the pipeline's experiment,
                                                  RUNNING, with params stage, seeds, k and scores_from
    log_seed(seeds_run, stage, entry)             a FINISHED child `<stage>-seed-<k>`: param seed, the
                                                  seed's four scores, tag fcn.training_run
    finish_seeds_run(seeds_run, doc, path)        <score>_mean and <score>_std, the spread file; FINISHED
    end_seeds_run(seeds_run, status)              FAILED, or KILLED on Ctrl-C

Why each seed gets a child of its own that names its training run, rather than the training
runs nested under the parent: MLflow nests a run under one parent (its mlflow.parentRunId
tag), and a stage's training run has one already: the run that trained its starting weights
(pipelines.track.stage_runs; the FCN-32s > FCN-16s > FCN-8s tree). Nesting it under the
parent instead would cut that lineage; the stage tags its parent again whenever it resumes,
so the two would overwrite each other; and the seed equal to train.seed trains the
pipeline's own run, which would leave its place in the pipeline's tree. So the training runs
stay where their lineage puts them, and the parent's children are small runs that hold each
seed's scores and point at its training run (the fcn.training_run tag, and a link in the
run's description). The parent and children carry no fcn.stage tag: `fcn status` lists
training runs only.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from fcn_models.metrics import SCORE_KEYS
from pipelines.core.params import Params
from pipelines.track.seed_spread import SOURCES
from pipelines.track.stage_runs import NOTE_TAG, PARENT_RUN_TAG
from pipelines.track.store import TrackingError, set_up, tracking_uri

# On the parent and its children: the stage whose seeds they are.
SEEDS_TAG = "fcn.seeds"
# On a child: its seed, and the MLflow run that trained it.
SEED_TAG = "fcn.seed"
TRAINING_RUN_TAG = "fcn.training_run"


def run_name(stage: str) -> str:
    return f"seeds-{stage}"


def spread_metric(score: str, part: str) -> str:
    """The parent's metric of a score's mean or std: "mean_iu_mean", "mean_iu_std"."""
    return f"{score}_{part}"


@dataclasses.dataclass(frozen=True)
class SeedsRun:
    """The parent run of one `fcn seeds`."""
    tracking_uri: str
    experiment_id: str
    run_id: str

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)


def open_seeds_run(params: Params, stage: str, seeds: list[int], source: str) -> SeedsRun:
    """A new parent run, RUNNING, in the pipeline's experiment; TrackingError when the store cannot be used."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    uri = tracking_uri(params)
    note = (f"The spread of {stage}'s scores over {len(seeds)} training seeds ({', '.join(map(str, seeds))}): "
            f"mean and sample standard deviation of each score (<score>_mean, <score>_std) of "
            f"{SOURCES[source]}. "
            "Each child run holds one seed's scores and names the run that trained it (fcn.training_run).")
    try:
        experiment_id = set_up(params)
        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(experiment_id, run_name=run_name(stage), tags={SEEDS_TAG: stage, NOTE_TAG: note})
        client.log_batch(run.info.run_id, params=[
            Param("stage", stage), Param("seeds", ",".join(map(str, seeds))), Param("k", str(len(seeds))),
            Param("scores_from", source)])
    except Exception as err:  # no parent run, no spread in MLflow: stop before anything trains
        raise TrackingError(
            f"cannot open the MLflow tracking store {uri}: {type(err).__name__}: {err}. Start the tracking "
            "server, or point mlflow.tracking_uri / MLFLOW_TRACKING_URI at a reachable one") from err
    print(f"[seeds] MLflow run {run.info.run_id} ({run_name(stage)}) in experiment {params.mlflow.experiment!r} "
          f"at {uri}", flush=True)
    return SeedsRun(uri, experiment_id, run.info.run_id)


def _score_metrics(values: dict, now: int) -> list:
    from mlflow.entities import Metric

    return [Metric(key, float(value), now, 0) for key, value in values.items() if value is not None]


def log_seed(seeds_run: SeedsRun, stage: str, entry: dict) -> str:
    """A FINISHED child of the parent for one seed; entry: "seed", the four scores and
    "training_run" (the MLflow run that trained it, or None). Returns the child's run id."""
    from mlflow.entities import Param

    client = seeds_run.client()
    seed, training_run = entry["seed"], entry.get("training_run")
    tags = {PARENT_RUN_TAG: seeds_run.run_id, SEEDS_TAG: stage, SEED_TAG: str(seed)}
    if training_run:
        tags[TRAINING_RUN_TAG] = training_run
        tags[NOTE_TAG] = (f"Seed {seed} of {stage}. Trained by run "
                          f"[{training_run}](#/experiments/{seeds_run.experiment_id}/runs/{training_run}).")
    child = client.create_run(seeds_run.experiment_id, run_name=f"{stage}-seed-{seed}", tags=tags)
    child_id = child.info.run_id
    client.log_batch(child_id, params=[Param("seed", str(seed))],
                     metrics=_score_metrics({k: entry.get(k) for k in SCORE_KEYS}, int(time.time() * 1000)))
    client.set_terminated(child_id, status="FINISHED")
    return child_id


def finish_seeds_run(seeds_run: SeedsRun, doc: dict, spread_path: Path) -> None:
    """Log the spread (doc: pipelines.track.seed_spread.spread_report) to the parent as
    <score>_mean and <score>_std, with the spread file as an artifact; mark it FINISHED."""
    client = seeds_run.client()
    values = {spread_metric(key, part): doc["scores"][key][part] for key in SCORE_KEYS for part in ("mean", "std")}
    client.log_batch(seeds_run.run_id, metrics=_score_metrics(values, int(time.time() * 1000)))
    client.log_artifact(seeds_run.run_id, str(spread_path))
    client.set_terminated(seeds_run.run_id, status="FINISHED")


def end_seeds_run(seeds_run: SeedsRun, status: str = "FAILED") -> None:
    """Mark the parent ended (FAILED, KILLED); an error doing so is reported, not raised, so it
    cannot hide the one that ended the command."""
    try:
        seeds_run.client().set_terminated(seeds_run.run_id, status=status)
    except Exception as err:
        print(f"MLflow: could not mark run {seeds_run.run_id} {status}: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)
