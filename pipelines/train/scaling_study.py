"""`fcn scaling-study`: one stage trained at several global batches under train.scaling's rule, each for several seeds.

    parse_config("2x1") -> Config(workers=2, images=1)      workers x images a worker
    config_params(params, config, warmup_images=, crop_size=) -> Params   what a configuration runs with
    run_study(params, stage, configs, seeds, root, ...) -> dict   train them all, write the report

A configuration changes only how a step is made, never what the stage is meant to see:
ray.num_workers and train.batch_size (one image: whole images, as the reference; more:
crops of augment.crop_size, `crop_size` here), with train.scaling set to the optimizer's
rule (linear for SGD, sqrt for Adam: pipelines/train/scaling.py) so that every configuration
sees the params' images at their per-image step. The machine's CPUs for training
(ray.num_workers x ray.cpus_per_worker of the params) are shared among its workers.

Each configuration's outputs are its own: models and reports under
<train.models_dir>/scaling/<label> and <train.reports_dir>/scaling/<label>, and in them each
seed's as `fcn seeds` lays them out (pipelines.train.seeds.run_seeds runs them, so each
configuration is an MLflow parent run with a child per seed, and resumes after a failure).
Every seed of every configuration starts where the pipeline's stage starts.

The report (pipelines.track.scaling_report): reports/scaling/<stage>.json and .md (the
table) and <evaluate.figures_dir>/scaling-<stage>.png (the curves against images seen).
The first configuration is the reference the others are compared with.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

from pipelines.core.console import say
from pipelines.core.errors import UsageError
from pipelines.core.params import Params, ParamsError
from pipelines.track import scaling_report, seed_spread
from pipelines.train import recipe, scaling, seeds

STUDY_DIR = "scaling"
DEFAULT_CONFIGS = ("1x1", "2x1", "1x4")
RULE_FOR = {"sgd": "linear", "adam": "sqrt"}


@dataclasses.dataclass(frozen=True)
class Config:
    """workers x images a worker."""
    workers: int
    images: int

    @property
    def label(self) -> str:
        return f"{self.workers}x{self.images}"


def parse_config(text: str) -> Config:
    """'2x1' -> Config(2, 1); UsageError naming the text otherwise."""
    match = re.fullmatch(r"([1-9][0-9]{0,2})x([1-9][0-9]{0,2})", text)
    if not match:
        raise UsageError(f"configuration {text!r}: expected WORKERSxIMAGES, such as 1x1, 2x1 or 1x4")
    return Config(int(match[1]), int(match[2]))


def _replace(section, **changes):
    return dataclasses.replace(section, **changes)


def config_params(params: Params, config: Config, *, warmup_images: int | None = None,
                  crop_size: int | None = None) -> Params:
    """The params of one configuration (see the module's text); ParamsError (naming the
    configuration) when they do not hold together, as params would refuse them."""
    rule = RULE_FOR[params.train.optimizer]
    cpus = params.ray.num_workers * params.ray.cpus_per_worker
    label = config.label
    try:  # the sections check themselves as params does, on the configuration's values
        train = _replace(
            params.train, scaling=rule,
            batch_mode="whole" if config.images == 1 else "crops", batch_size=config.images,
            warmup_images=params.train.warmup_images if warmup_images is None else warmup_images,
            models_dir=str(Path(params.train.models_dir) / STUDY_DIR / label),
            reports_dir=str(Path(params.train.reports_dir) / STUDY_DIR / label))
        augment = params.augment if crop_size is None else _replace(params.augment, crop_size=crop_size)
        ray = _replace(params.ray, num_workers=config.workers, cpus_per_worker=cpus / config.workers)
        return dataclasses.replace(params, train=train, augment=augment, ray=ray)
    except ParamsError as err:
        raise UsageError(f"configuration {label}: {err}") from None


def report_paths(params: Params, stage: str) -> tuple[Path, Path, Path]:
    """The study's JSON, Markdown table and figure."""
    reports = Path(params.train.reports_dir) / STUDY_DIR
    return (reports / f"{stage}.json", reports / f"{stage}.md",
            Path(params.evaluate.figures_dir) / f"scaling-{stage}.png")


def run_study(params: Params, stage: str, configs: list[Config], seed_list: list[int], root: Path, *,
              warmup_images: int | None = None, crop_size: int | None = None,
              train: Callable[..., dict] | None = None) -> dict:
    """Train every configuration for every seed (pipelines.train.seeds.run_seeds), then write the
    report; return its numbers (pipelines.track.scaling_report.summarize)."""
    if len({c.label for c in configs}) != len(configs):
        raise UsageError(f"configurations {' '.join(c.label for c in configs)}: one is given twice")
    seed_spread.check_seeds(seed_list)
    planned = {c.label: config_params(params, c, warmup_images=warmup_images, crop_size=crop_size)
               for c in configs}
    init = recipe.resolve_init(params, stage)  # the pipeline's start, for every configuration
    runs = {}
    for number, (label, changed) in enumerate(planned.items(), 1):
        derived = scaling.for_stage(changed, stage)
        say(f"[scaling-study] {stage}, configuration {label} ({number} of {len(planned)}): {derived.note}")
        seeds.run_seeds(changed, stage, seed_list, root, train=train, init=init)
        dirs = {seed: Path(seed_spread.seed_reports_dir(changed, seed)) / stage for seed in seed_list}
        runs[label] = {"global_batch": derived.global_batch, "lr": derived.lr, "iterations": derived.iterations,
                       "momentum": derived.momentum, "beta2": derived.beta2,
                       "warmup_iterations": derived.warmup_iterations, "seeds": dirs}
    doc = scaling_report.summarize(runs, configs[0].label)
    doc.update(stage=stage, seeds=list(seed_list), rule=RULE_FOR[params.train.optimizer],
               base_lr=params.train.stages[stage].lr, base_iterations=params.train.stages[stage].iterations)
    scaling_report.write_report(doc, runs, *report_paths(params, stage))
    return doc
