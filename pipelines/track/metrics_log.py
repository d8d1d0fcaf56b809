"""Metrics on a stage's MLflow run: rank 0's while training, the driver's catch-up, evaluate's scores.

    MetricsLog            Ray Train rank 0, while training: each validation row (loss
                          and the four scores, step = iteration) and the training loss
    log_missing_rows(...) the rows of a history not yet in the run (the driver, when the
                          stage ends; rank 0, when an attempt resumes)
    log_evaluation(...)   the evaluate stage: full-resolution scores on the stage's run
    log_figures(...)      the evaluate stage: its pictures on the final stage's run (figures/)

A logging error on rank 0 is reported and logging stops for that attempt, but
training goes on: every validation row is also in the checkpoint's history, and the
driver logs the missing ones when the stage ends.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from fcn_models.metrics import SCORE_KEYS
from pipelines.core.params import Params
from pipelines.track.store import tracking_uri

# The training loss every train.log_every iterations, beside the validation rows' `loss`
# (the mean training loss since the previous validation, as history.csv has it).
TRAIN_LOSS_KEY = "train_loss"
# The validation rows of a stage as the train stage writes them into reports/<stage>/, and
# the learning curves (pipelines.track.chain_figures) read them.
HISTORY_CSV = "history.csv"
# Evaluate's full-resolution scores on a stage's run: eval/<score> and eval/iu/<class>.
EVAL_PREFIX = "eval/"
# Evaluate's pictures (Figure 4, the learning curves), artifacts of the final stage's run.
FIGURES_DIR = "figures"


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


@dataclasses.dataclass(frozen=True)
class RunTarget:
    """What rank 0 needs to log to a stage's run (stage_runs.StageRun.for_workers); picklable."""
    tracking_uri: str
    run_id: str


class MetricsLog:
    """What rank 0 logs to the stage's run while training; does nothing on other ranks,
    or without a run (tracking None).

    After the first logging error it stops for this attempt (reported on stderr):
    training goes on, and the driver logs the validation rows still missing at the end.
    """

    def __init__(self, tracking: RunTarget | None, rank: int, stage: str):
        self.client, self.run_id, self.stage = None, None, stage
        self.validated: set[int] = set()
        self.train_loss_after = 0
        if not tracking or rank != 0:
            return
        uri = tracking.tracking_uri
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            # The driver created it: absent means this worker runs on another node.
            self._give_up(f"the tracking store {uri} is not on this node (use a tracking server "
                          "on a multi-node cluster)")
            return
        self._call(lambda: self._connect(tracking))

    def _connect(self, tracking: RunTarget) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri=tracking.tracking_uri), tracking.run_id

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
    client = _evaluated_run(params, run_id, "its scores are in the report file only")
    if client is None:
        return False
    client.log_batch(run_id, metrics=evaluation_metrics(entry, step))
    return True


def log_evaluation_or_warn(params: Params, entry: dict, prog: str, what: str) -> None:
    """log_evaluation of an entry to the run its checkpoint names, if any; a failure is a
    warning naming `what` was not logged: the scores are on disk already, and an MLflow
    outage must not lose them."""
    run_id = entry.get("mlflow_run_id")
    if not run_id:
        return
    try:
        log_evaluation(params, run_id, entry, entry.get("iterations") or 0)
    except Exception as err:
        print(f"[{prog}] WARNING: could not log {what} to MLflow run {run_id}: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)


def log_figures(params: Params, run_id: str, paths: list[Path]) -> bool:
    """Log evaluate's pictures to the training run `run_id` as artifacts under FIGURES_DIR;
    False (with a line saying why) when the store has no such run."""
    client = _evaluated_run(params, run_id, "its figures are on disk only")
    if client is None:
        return False
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path=FIGURES_DIR)
    return True


def _evaluated_run(params: Params, run_id: str, otherwise: str):
    """A client of the project's store when it holds run `run_id`; else None, with a line
    saying why and `otherwise`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        print(f"[evaluate] no MLflow store at {uri} (run {run_id}): {otherwise}", flush=True)
        return None
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        print(f"[evaluate] MLflow run {run_id} is not in {uri}: {otherwise}", flush=True)
        return None
    return client


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
