"""`fcn seeds`: one training stage run once per seed, and the spread of its scores.

    seed_params(params, seed)                   the params of one seed's run
    plan(params, stage, seeds)                  [SeedRun(seed, params, init)]: what each seed's run gets
    run_seeds(params, stage, seeds, root, ...)  train (and score) every seed, write the spread, track it

Each seed runs the train stage itself (pipelines.train.trainer.run_stage), with params that
differ from the pipeline's in three values: train.seed, and train.models_dir and
train.reports_dir moved to <models_dir>/seeds/seed-<k> and <reports_dir>/seeds/seed-<k>
(pipelines.track.seed_spread), so the pipeline's models/<stage> and reports/<stage> are never
written. The weights start where the pipeline's stage starts them: an earlier stage's
checkpoint is found in the pipeline's models_dir (resolved once, from the params as given),
so every seed of FCN-8s continues the same FCN-16s and the spread is that of this stage's
training alone.

The rest is the train stage's. Its Ray run is named by the result params, the seed among
them, so each seed is a run of its own: run `fcn seeds` again after a failure and each seed
resumes from its last checkpoint, a seed already trained has nothing left to train. The
seed equal to train.seed (with nothing else changed: the output directories are no result
param) is the pipeline's own run, trained once for both.

Scores: each seed's best validation scores (the metrics.json its run writes), or with
evaluate=True (`--evaluate`) its checkpoint scored on all of val as `fcn evaluate` scores it
(evaluation.json beside metrics.json, and eval/<score> on its training run). The spread
goes to reports/seeds/<stage>.json and to MLflow (pipelines.track.seed_runs: a parent run,
a child per seed naming its training run).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from fcn_models.checkpoint import read_meta
from fcn_models.metrics import SCORE_KEYS
from pipelines.core.console import say
from pipelines.core.errors import StageError
from pipelines.core.files import atomic_write_text
from pipelines.core.params import Params
from pipelines.data.shards import count_rows, shard_files
from pipelines.track import metrics_log, seed_runs, seed_spread, val_scores
from pipelines.track.store import TrackingError
from pipelines.train import recipe, trainer

# Beside a seed's metrics.json: its checkpoint scored as `fcn evaluate` scores it (--evaluate).
EVALUATION_FILE = "evaluation.json"


@dataclasses.dataclass(frozen=True)
class SeedRun:
    """One seed's run: its seed, its params (seed_params) and where its weights start."""
    seed: int
    params: Params
    init: recipe.StageInit

    def checkpoint(self, stage: str) -> Path:
        return Path(self.params.train.models_dir) / stage

    def reports(self, stage: str) -> Path:
        return Path(self.params.train.reports_dir) / stage


def seed_params(params: Params, seed: int) -> Params:
    """params with train.seed = seed and the seed's own models_dir and reports_dir."""
    train = dataclasses.replace(params.train, seed=seed,
                                models_dir=str(seed_spread.seed_models_dir(params, seed)),
                                reports_dir=str(seed_spread.seed_reports_dir(params, seed)))
    return dataclasses.replace(params, train=train)


def plan(params: Params, stage: str, seeds: list[int], init: recipe.StageInit | None = None) -> list[SeedRun]:
    """Each seed's run, from `init` (None: where the pipeline's stage starts); StageError for an
    unknown stage or an earlier stage not trained yet."""
    seeds = seed_spread.check_seeds(seeds)
    init = init or recipe.resolve_init(params, stage)  # the pipeline's models_dir, for every seed
    return [SeedRun(seed, seed_params(params, seed), init) for seed in seeds]


def _training_run(directory: Path) -> str | None:
    return read_meta(directory).get("mlflow_run_id")


def _evaluate_seed(run: SeedRun, stage: str, files: list[Path], total: int, device) -> dict:
    """The seed's checkpoint scored on all of val; written beside its metrics.json and logged to its run."""
    params = run.params
    entry = val_scores.score_checkpoint(
        run.checkpoint(stage), stage, files, total, device, params.evaluate.timing_images,
        params.inference.max_pixels, f"train it again with `fcn seeds --stage {stage} --seeds ...`")
    text = json.dumps({stage: entry}, indent=2, allow_nan=False) + "\n"
    atomic_write_text(run.reports(stage) / EVALUATION_FILE, text)
    metrics_log.log_evaluation_or_warn(params, entry, "seeds", f"seed {run.seed}'s scores")
    return entry


def run_seeds(params: Params, stage: str, seeds: list[int], root: Path, evaluate: bool = False, device=None,
              train: Callable[..., dict] | None = None, init: recipe.StageInit | None = None) -> dict:
    """Train `stage` once per seed, score each, write the spread file and track it in MLflow;
    return the spread (pipelines.track.seed_spread.spread_report).

    root: the project (pipelines.train.trainer.run_stage's); device: where --evaluate scores
    (None: val_scores.pick_device's); train: what trains one seed's run, with run_stage's
    arguments (None: run_stage itself); init: where every seed's weights start (None: where
    the pipeline's stage starts them)."""
    from ray.train import TrainingFailedError

    train = train or trainer.run_stage
    runs = plan(params, stage, seeds, init)
    for run in runs:
        trainer.check_outputs_outside_job_copy(run.params)
    source = "evaluate" if evaluate else "training"
    files, total = [], 0
    if evaluate:
        device = device or val_scores.pick_device()
        files = shard_files(params.data.shards_dir, "val")
        total = count_rows(files)
        if total == 0:
            raise val_scores.EvaluateError(f"{files[0].parent}: the val shards hold no image; re-run `fcn preprocess`")
    try:
        seeds_run = seed_runs.open_seeds_run(params, stage, [run.seed for run in runs], source)
    except TrackingError as err:
        raise StageError(str(err)) from None
    per_seed = []
    try:
        for number, run in enumerate(runs, 1):
            say(f"[seeds] {stage}, seed {run.seed} ({number} of {len(runs)}): outputs in {run.checkpoint(stage)} "
                f"and {run.reports(stage)}")
            try:
                metrics = train(run.params, stage, root, init=run.init)
            except TrainingFailedError as err:
                raise StageError(f"stage {stage}, seed {run.seed}, failed after ray.max_failures retries: {err}\n"
                                 "Running `fcn seeds` again resumes each seed from its last checkpoint.") from None
            scores = _evaluate_seed(run, stage, files, total, device) if evaluate else metrics
            entry = {"seed": run.seed, **{key: scores[key] for key in SCORE_KEYS},
                     "checkpoint": str(run.checkpoint(stage)), "training_run": _training_run(run.checkpoint(stage))}
            per_seed.append(entry)
            seed_runs.log_seed(seeds_run, stage, entry)
        doc = seed_spread.spread_report(stage, source, per_seed,
                                        seed_spread.result_params(recipe.stage_params(params, stage)),
                                        seeds_run.run_id)
        path = seed_spread.spread_file(params, stage)
        seed_spread.write_spread(path, doc)
        seed_runs.finish_seeds_run(seeds_run, doc, path)
    except BaseException as err:
        seed_runs.end_seeds_run(seeds_run, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    return doc
