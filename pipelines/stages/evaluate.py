"""Evaluate stage: each trained stage's best checkpoint scored on all of val, as the paper scores it.

    python -m pipelines.stages.evaluate [--params params.yaml] [--device auto|cpu|cuda]   (or `fcn evaluate`)

For every stage in evaluate.stages with a checkpoint in <train.models_dir>/<stage>
(a stage without one is skipped, with a line saying so), and every reference model of
evaluate.references imported into <evaluate.references_dir>/<name> (`fcn import`), the
model runs over every image of the val shards at the image's own size
(pipelines/track/val_scores.py). Results go to

    evaluate.report_file   JSON (DVC metrics): per stage the four scores, IU per class
                           (null where a class is in neither truth nor prediction),
                           images scored, forward time per image, and which checkpoint
                           (its weights' sha256) and MLflow run the scores belong to
    evaluate.table_file    Markdown: the paper's table layout in percent, with the
                           forward time per image and the machine it was timed on,
                           under a stage the mean ± std of its scores over training
                           seeds where `fcn seeds` made one with the stage's params as
                           they are (<train.reports_dir>/seeds/<stage>.json), then the
                           published numbers of the same networks
    evaluate.figures_dir   figure4.png: the paper's Figure 4, the first
                           evaluate.figure_images val images by id with their truth and
                           each stage's prediction; learning_curves.png: every stage's val
                           mean IU and training loss from reports/<stage>/history.csv,
                           stages end to end (pipelines/track/chain_figures.py)

and each stage's scores are logged to the MLflow run that trained its checkpoint
(eval/<score>, eval/iu/<class>), and the two figures to the final stage's run (the last
of evaluate.stages with a checkpoint) under figures/. The register stage gates the
champion on the scores.
Images are decoded as the training pipeline decodes them (pipelines.data.shards); the
shards are read with pyarrow, no Ray.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fcn_models.metrics import SCORE_KEYS
from pipelines.core.exits import run_main
from pipelines.core.files import atomic_write_text
from pipelines.core.params import Params, load_params
from pipelines.data.shards import count_rows, iter_samples, shard_files
from pipelines.track import chain_figures, metrics_log, seed_spread
from pipelines.track.val_scores import (
    EvaluateError,
    device_description,
    format_table,
    pick_device,
    reference_key,
    score_checkpoint,
    stride_ceilings,
)
from pipelines.train.recipe import stage_command, stage_params


def find_checkpoints(params: Params) -> dict[str, tuple[Path, str]]:
    """{report key: (checkpoint directory, how to remake it)} for the stages of evaluate.stages
    and the reference models of evaluate.references that have a checkpoint, in that order."""
    models_dir, references_dir = Path(params.train.models_dir), Path(params.evaluate.references_dir)
    found = {}
    for stage in params.evaluate.stages:
        directory = models_dir / stage
        if directory.exists():
            found[stage] = (directory, f"retrain it with {stage_command(stage)}")
        else:
            print(f"[evaluate] {stage}: no checkpoint at {directory}, skipped", flush=True)
    for name in params.evaluate.references:
        directory = references_dir / name
        if directory.exists():
            found[reference_key(name)] = (directory, f"import it again with `fcn import SOURCE --out {directory}`")
    if not found:
        example = "fcn32s" if "fcn32s" in params.evaluate.stages else params.evaluate.stages[0]
        raise EvaluateError(
            f"no checkpoint for any of evaluate.stages ({', '.join(params.evaluate.stages)}) in {models_dir}, "
            f"nor of evaluate.references in {references_dir}: train one first, e.g. {stage_command(example)}")
    return found


def seed_spreads(params: Params, stages) -> dict[str, tuple[str, list[str]]]:
    """{stage: its row of the table} for the stages with a spread over seeds (`fcn seeds`,
    pipelines.track.seed_spread) made with the stage's result params as they are now; a
    spread that cannot be read, or was made with other params, is left out with a line saying why."""
    rows = {}
    for stage in stages:
        path = seed_spread.spread_file(params, stage)
        if stage not in params.train.stages or not path.exists():
            continue
        try:
            doc = seed_spread.read_spread(path, stage)
        except seed_spread.SpreadError as err:
            print(f"[evaluate] WARNING: {err}; the table has no spread for {stage}", file=sys.stderr, flush=True)
            continue
        changed = seed_spread.changed_params(doc, seed_spread.result_params(stage_params(params, stage)))
        if changed:
            print(f"[evaluate] {stage}: the spread over seeds in {path} was made with other params ("
                  + ", ".join(f"{k} {then} -> {now}" for k, (then, now) in list(changed.items())[:3])
                  + (", ..." if len(changed) > 3 else "") + "), left out of the table; run `fcn seeds` again",
                  flush=True)
            continue
        rows[stage] = seed_spread.table_row(doc)
    return rows


def evaluate(params: Params, device: torch.device | None = None) -> dict:
    """Score every stage that has a checkpoint, write the report and table, log the scores
    to each checkpoint's MLflow run; return the report."""
    device = device or pick_device()
    files = shard_files(params.data.shards_dir, "val")
    total = count_rows(files)
    if total == 0:
        raise EvaluateError(f"{files[0].parent}: the val shards hold no image; re-run `fcn preprocess`")
    checkpoints = find_checkpoints(params)
    timing_images = params.evaluate.timing_images
    samples = chain_figures.figure_samples(files, params.evaluate.figure_images)

    report, predictions = {}, {}
    for stage, (directory, remake) in checkpoints.items():
        def predict(model, stage=stage):
            if stage in params.evaluate.stages:
                predictions[stage] = chain_figures.predict_masks(model, samples, device)

        entry = score_checkpoint(directory, stage, files, total, device, timing_images,
                                 params.inference.max_pixels, remake, also=predict)
        report[stage] = entry
        print(f"[{stage}] " + "  ".join(f"{key} {entry[key]:.4f}" for key in SCORE_KEYS)
              + (f"  forward {entry['forward_ms']:.1f} ms/image" if entry["forward_ms"] is not None else ""),
              flush=True)

    # Both texts before either file: allow_nan=False makes a NaN that slipped through fail here.
    report_text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    ceilings = stride_ceilings(iter_samples(files), params.model.num_classes)
    print("[evaluate] the best an output stride allows, mean IU: "
          + ", ".join(f"stride {s} {c['mean_iu']:.4f}" for s, c in ceilings.items()), flush=True)
    table_text = format_table(report, total, timing_images, device_description(device), ceilings,
                              seed_spreads(params, report))
    atomic_write_text(Path(params.evaluate.report_file), report_text)
    atomic_write_text(Path(params.evaluate.table_file), table_text)
    figures = chain_figures.write_evaluation_figures(params, samples, predictions)
    for stage, entry in report.items():
        metrics_log.log_evaluation_or_warn(params, entry, "evaluate", f"{stage}'s scores")
    final = list(predictions)[-1] if predictions else None
    final_run = report[final]["mlflow_run_id"] if final else None
    if figures and final and not final_run:
        print(f"[evaluate] {final}'s checkpoint names no MLflow run: the figures are on disk only", flush=True)
    if figures and final_run:
        try:
            metrics_log.log_figures(params, final_run, figures)
        except Exception as err:  # the figures are written; an MLflow outage must not lose them
            print(f"[evaluate] WARNING: could not log the figures to MLflow run {final_run}: "
                  f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml",
                        help="params file; relative paths are taken from its directory (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: %(default)s)")
    args = parser.parse_args(argv)

    def body():
        params = load_params(args.params)
        report = evaluate(params, pick_device(args.device))
        print(f"[evaluate] {len(report)} stage(s) written to {params.evaluate.report_file} and "
              f"{params.evaluate.table_file}", flush=True)

    return run_main("evaluate", body)


if __name__ == "__main__":
    sys.exit(main())
