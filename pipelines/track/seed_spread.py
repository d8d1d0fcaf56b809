"""The spread of a stage's scores over training seeds, and where `fcn seeds` keeps each seed's outputs.

    seed_models_dir(params, seed)    <train.models_dir>/seeds/seed-<k>: the seed's checkpoint in <stage>/
    seed_reports_dir(params, seed)   <train.reports_dir>/seeds/seed-<k>: its metrics.json, history.csv
    spread_file(params, stage)       <train.reports_dir>/seeds/<stage>.json
    check_seeds(seeds)               at least two, none twice, each one train.seed may be
    spread(per_seed)                 {score: {"mean", "std"}} over the seeds
    spread_report(...), write_spread(path, doc), read_spread(path, stage)   the file
    spread_lines(doc)                the terminal's table: each seed's scores, then mean ± std
    table_row(doc)                   the evaluation table's row: its label and `mean ± std` cells
    result_params(stage_params), changed_params(doc, now)   what the spread was made with, and what moved since

A seed's directories are a models_dir and a reports_dir of their own, laid out as the
pipeline's (<stage>/ in each), beside the pipeline's and never in place of them:
models/<stage> and reports/<stage> stay what the train stage wrote. No stage can be called
"seeds" (a stage is named after its network), so the names cannot meet.

The standard deviation is the sample one (divided by K - 1): the seeds run are a sample of
the seeds one could run, and two are the fewest that give one. A score that is null for a
seed (no pixel of a class anywhere) makes its mean and deviation null.

Nothing here talks to MLflow (pipelines.track.seed_runs does): the evaluate stage reads the
spread files through this module alone.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from fcn_models.errors import FCNError
from fcn_models.metrics import SCORE_HEADINGS, SCORE_KEYS
from pipelines.core.errors import UsageError
from pipelines.core.files import atomic_write_text
from pipelines.core.params import Params

SEEDS_DIR = "seeds"
# The param the seeds vary (a key of pipelines.train.recipe.RESULT_PARAMS).
SEED_PARAM = "train.seed"
# The seeds a command may ask for: every generator the training seeds from them (numpy's
# SeedSequence, torch.manual_seed with a rank and iteration offset added) takes these.
MAX_SEED = 2**32 - 1
# Where a spread's scores come from: words for the terminal and MLflow, and for the evaluation table's row.
SOURCES = {
    "training": "each seed's best validation scores while training (the checkpoint it keeps), "
                "on the val images at their own sizes",
    "evaluate": "each seed's checkpoint scored as `fcn evaluate` scores it",
}
SOURCE_IN_TABLE = {"training": "as validated in training", "evaluate": "scored as above"}


class SpreadError(FCNError, RuntimeError):
    """A spread file that cannot be read; the message names it and what to do."""


def seed_dir(seed: int) -> str:
    return f"seed-{seed}"


def seed_models_dir(params: Params, seed: int) -> Path:
    """The models_dir of one seed's runs (its checkpoint of a stage in <stage>/)."""
    return Path(params.train.models_dir) / SEEDS_DIR / seed_dir(seed)


def seed_reports_dir(params: Params, seed: int) -> Path:
    """The reports_dir of one seed's runs (its metrics.json and history.csv of a stage in <stage>/)."""
    return Path(params.train.reports_dir) / SEEDS_DIR / seed_dir(seed)


def spread_file(params: Params, stage: str) -> Path:
    return Path(params.train.reports_dir) / SEEDS_DIR / f"{stage}.json"


def check_seeds(seeds: list[int]) -> list[int]:
    """The seeds, in the order given; UsageError naming the one that cannot be used."""
    if len(seeds) < 2:
        raise UsageError(f"--seeds {' '.join(map(str, seeds))}: name at least two seeds (e.g. --seeds 0 1 2): "
                         "one seed has no spread")
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise UsageError(f"--seeds: {seed} is not a seed: use integers from 0 to {MAX_SEED}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UsageError(f"--seeds: {', '.join(map(str, repeated))} named twice: a seed trains the same "
                         "network every time, so a repeat would count one result twice")
    return list(seeds)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def spread(per_seed: list[dict]) -> dict[str, dict]:
    """{score: {"mean": ..., "std": ...}} over the seeds' scores (each a dict with SCORE_KEYS):
    the mean and the sample standard deviation, both None when a seed's score is None."""
    if len(per_seed) < 2:
        raise ValueError(f"a spread needs two seeds or more, got {len(per_seed)}")
    out = {}
    for key in SCORE_KEYS:
        values = [entry.get(key) for entry in per_seed]
        if all(_finite(v) for v in values):
            out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values)}
        else:
            out[key] = {"mean": None, "std": None}
    return out


def result_params(stage_params: dict[str, str]) -> dict[str, str]:
    """A stage's result params (pipelines.train.recipe.stage_params) without the seed: what every
    seed of a spread shares, and what must still hold for the spread to stand beside a stage."""
    return {k: v for k, v in sorted(stage_params.items()) if k != SEED_PARAM}


def spread_report(stage: str, source: str, per_seed: list[dict], params: dict[str, str],
                  mlflow_run_id: str | None) -> dict:
    """The spread file's content. per_seed: one dict a seed ("seed", the four scores, where
    its checkpoint is, its training run); params: result_params of the seeds' runs."""
    if source not in SOURCES:
        raise ValueError(f"source {source!r}: one of {', '.join(SOURCES)}")
    return {
        "stage": stage,
        "seeds": [entry["seed"] for entry in per_seed],
        "k": len(per_seed),
        "source": source,
        "scores": spread(per_seed),
        "per_seed": per_seed,
        "params": params,
        "mlflow_run_id": mlflow_run_id,
    }


def write_spread(path: Path, doc: dict) -> None:
    """The spread file, written whole; a NaN fails here rather than in a reader."""
    atomic_write_text(Path(path), json.dumps(doc, indent=2, allow_nan=False) + "\n")


def read_spread(path: Path, stage: str) -> dict | None:
    """The spread file of `stage` at `path`, checked; None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    again = f"run `fcn seeds --stage {stage} --seeds ...` again, or remove it"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SpreadError(f"{path}: not a readable spread file ({err}); {again}") from None
    if not isinstance(doc, dict) or doc.get("stage") != stage:
        raise SpreadError(f"{path}: not the spread of stage {stage}; {again}")
    seeds, scores = doc.get("seeds"), doc.get("scores")
    if not (isinstance(seeds, list) and len(seeds) >= 2 and all(isinstance(s, int) for s in seeds)
            and doc.get("k") == len(seeds)):
        raise SpreadError(f"{path}: 'seeds' must list the k >= 2 seeds, got {seeds!r} and k {doc.get('k')!r}; "
                          f"{again}")
    for key in SCORE_KEYS:
        entry = scores.get(key) if isinstance(scores, dict) else None
        if not (isinstance(entry, dict)
                and all(entry.get(part) is None or _finite(entry.get(part)) for part in ("mean", "std"))):
            raise SpreadError(f"{path}: no mean and std of {key}; {again}")
    if doc.get("source") not in SOURCES or not isinstance(doc.get("params"), dict):
        raise SpreadError(f"{path}: no 'source' or 'params' of the kind fcn seeds writes; {again}")
    return doc


def changed_params(doc: dict, now: dict[str, str]) -> dict[str, tuple]:
    """{key: (the spread's value, today's)} for the result params (result_params) that differ."""
    then = doc["params"]
    return {k: (then.get(k), now.get(k)) for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)}


def _percent(value, digits: int) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def _seeds_text(doc: dict) -> str:
    return ", ".join(map(str, doc["seeds"]))


def spread_lines(doc: dict) -> list[str]:
    """The spread as a table for the terminal, in percent: a row per seed, then mean ± std."""
    heading = ["seed", *SCORE_HEADINGS.values()]
    rows = [[str(entry["seed"]), *(_percent(entry.get(k), 2) for k in SCORE_KEYS)] for entry in doc["per_seed"]]
    rows.append(["mean ± std", *(f"{_percent(doc['scores'][k]['mean'], 2)} ± {_percent(doc['scores'][k]['std'], 2)}"
                                 for k in SCORE_KEYS)])
    widths = [max(len(row[i]) for row in (heading, *rows)) for i in range(len(heading))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (heading, *rows)]


def table_row(doc: dict) -> tuple[str, list[str]]:
    """(what the row is, its cells in SCORE_HEADINGS order) for the evaluation table, in percent
    to one decimal like the rows above it:
    ("3 seeds (0, 1, 2), mean ± std, scored as above", ["90.1 ± 0.2", ...])."""
    cells = [f"{_percent(doc['scores'][k]['mean'], 1)} ± {_percent(doc['scores'][k]['std'], 1)}"
             if doc["scores"][k]["mean"] is not None else "n/a" for k in SCORE_HEADINGS]
    return f"{doc['k']} seeds ({_seeds_text(doc)}), mean ± std, {SOURCE_IN_TABLE[doc['source']]}", cells
