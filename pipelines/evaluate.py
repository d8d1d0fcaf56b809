"""Evaluate stage: each trained stage's best checkpoint scored on all of val, as the paper scores it.

    python -m pipelines.evaluate [--params params.yaml] [--device auto|cpu|cuda]

For every stage in evaluate.stages with a checkpoint in <train.models_dir>/<stage>
(a stage without one is skipped, with a line saying so), the model runs over every
image of the val shards at the image's own size: batch 1, no augmentation, the
per-pixel argmax counted into one confusion matrix over the whole split (rows =
truth, void pixels skipped), which gives the four scores and the IU of each class
(fcn_models.metrics). Results go to

    evaluate.report_file   JSON (DVC metrics): per stage the four scores, IU per class
                           (null where a class is in neither truth nor prediction),
                           images scored and forward time per image
    evaluate.table_file    Markdown: the paper's table layout in percent, with the
                           forward time per image and the machine it was timed on

Forward time is the mean over evaluate.timing_images val images after one warm-up
image, the forward pass alone (the device synchronised around it on a GPU).
Images are decoded with OpenCV, as the training pipeline decodes them. The Parquet
shards are read directly with pyarrow: no Ray.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fcn_models.checkpoint import load_checkpoint
from fcn_models.fcn import optimize_for_inference
from fcn_models.metrics import ConfusionMatrix
from fcn_models.palette import class_names
from fcn_models.preprocess import normalize
from fcn_models.summary import cpu_model, machine
from pipelines.files import atomic_write_text
from pipelines.params import Params, ParamsError, load_params, resolve
from pipelines.shards import ShardError, decode_sample
from pipelines.train import SCORE_KEYS, stage_command

# Row names of the paper's table; any other stage keeps its own name.
DISPLAY_NAMES = {"fcn32s-fixed": "FCN-32s-fixed", "fcn32s": "FCN-32s", "fcn16s": "FCN-16s", "fcn8s": "FCN-8s",
                 "fcn8s-atonce": "FCN-8s at-once"}
TABLE_COLUMNS = {"pixel_acc": "pixel acc.", "mean_acc": "mean acc.", "mean_iu": "mean IU", "fw_iu": "f.w. IU"}
SHARD_COLUMNS = ["id", "image", "label"]
PROGRESS_EVERY = 100


class EvaluateError(RuntimeError):
    """Evaluation that cannot run as configured; the message names the file and what to do."""


# --------------------------------------------------------------------------- val shards

def val_shards(params: Params, root: Path) -> list[Path]:
    split_dir = resolve(params.data.shards_dir, root) / "val"
    files = sorted(split_dir.glob("part-*.parquet"))
    if not files:
        raise EvaluateError(f"{split_dir}: no part-*.parquet val shards; run `python -m pipelines.preprocess` "
                            "(or `dvc repro preprocess`), or check data.shards_dir")
    return files


def _open_shard(path: Path) -> pq.ParquetFile:
    try:
        shard = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise EvaluateError(f"{path}: not a readable Parquet shard ({err}); re-run `python -m pipelines.preprocess`") \
            from None
    missing = [c for c in SHARD_COLUMNS if c not in shard.schema_arrow.names]
    if missing:
        raise EvaluateError(f"{path}: shard lacks column {', '.join(missing)} (a shard has id, source, image, label, "
                            "height, width); re-run `python -m pipelines.preprocess`")
    return shard


def count_images(files: list[Path]) -> int:
    """Rows in all shards, from the Parquet footers."""
    return sum(_open_shard(path).metadata.num_rows for path in files)


def decode(path: Path, sample_id: str, image_bytes: bytes, label_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One shard row -> (H x W x 3 uint8 RGB image, H x W uint8 label), as training decodes it."""
    try:
        return decode_sample(sample_id, image_bytes, label_bytes)
    except ShardError as err:
        raise EvaluateError(f"{path}: {err}") from None


def read_val(files: list[Path]) -> Iterator[tuple[Path, str, np.ndarray, np.ndarray]]:
    """(shard, id, image, label) for every row, one row group in memory at a time."""
    for path in files:
        shard = _open_shard(path)
        for group in range(shard.num_row_groups):
            try:
                table = shard.read_row_group(group, columns=SHARD_COLUMNS)
            except (pa.ArrowException, OSError) as err:
                raise EvaluateError(f"{path}: row group {group} cannot be read ({err}); "
                                    "re-run `python -m pipelines.preprocess`") from None
            columns = [table.column(name).to_pylist() for name in SHARD_COLUMNS]
            for sample_id, image_bytes, label_bytes in zip(*columns):
                yield (path, str(sample_id), *decode(path, sample_id, image_bytes, label_bytes))


# --------------------------------------------------------------------------- scoring

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvaluateError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluateError(f"--device {name}: CUDA is not available here; use --device cpu (or auto)")
    return device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_model(model: torch.nn.Module, samples, device: torch.device, timing_images: int,
                total: int | None = None, name: str = "model") -> tuple[ConfusionMatrix, int, list[float]]:
    """Run `model` (in eval mode, on `device`) over (shard, id, image, label) samples.

    Returns the confusion matrix over all of them, the number of images, and the
    forward times in seconds of images 2 .. timing_images + 1 (the first is the warm-up).
    """
    matrix = ConfusionMatrix(model.num_classes)
    times: list[float] = []
    start, images = time.perf_counter(), 0
    with torch.inference_mode():
        for index, (path, sample_id, image, label) in enumerate(samples):
            pixels = torch.from_numpy(image).permute(2, 0, 1).to(device)
            x = normalize(pixels, model.input_norm)[None]
            timed = 1 <= index <= timing_images
            if timed:
                _synchronize(device)
                tick = time.perf_counter()
            scores = model(x)
            if timed:
                _synchronize(device)
                times.append(time.perf_counter() - tick)
            prediction = scores.argmax(1)[0]
            if tuple(prediction.shape) != label.shape:
                raise EvaluateError(f"{name}: scores of shape {tuple(prediction.shape)} for the "
                                    f"{label.shape} image {sample_id} of {path}: the network does not keep the size")
            try:
                matrix.update(prediction, torch.from_numpy(label))
            except ValueError as err:
                raise EvaluateError(f"{path}: sample {sample_id}: {err}; re-run `python -m pipelines.preprocess`") \
                    from None
            images += 1
            if images % PROGRESS_EVERY == 0:
                rate = images / max(time.perf_counter() - start, 1e-9)
                print(f"[{name}] {images}/{total if total is not None else '?'} images  {rate:.1f} images/s",
                      flush=True)
    return matrix, images, times


def _finite_or_none(value: float):
    return None if value is None or math.isnan(value) else value


def stage_report(matrix: ConfusionMatrix, images: int, times: list[float], device: torch.device) -> dict:
    """The JSON entry of one stage: four scores, per-class IU by name, images, forward time."""
    scores = matrix.scores()
    names = class_names()
    if len(names) != matrix.num_classes:
        names = [f"class {i}" for i in range(matrix.num_classes)]
    return {
        **{key: _finite_or_none(scores[key]) for key in SCORE_KEYS},
        "per_class_iu": {name: _finite_or_none(iu) for name, iu in zip(names, scores["per_class_iu"])},
        "images": images,
        "forward_ms": 1000 * statistics.fmean(times) if times else None,
        "forward_ms_median": 1000 * statistics.median(times) if times else None,
        "timed_images": len(times),
        "device": device.type,
    }


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} (host: {cpu_model()})"
    return machine()


# --------------------------------------------------------------------------- the stage

def find_checkpoints(params: Params, root: Path) -> dict[str, Path]:
    """{stage: checkpoint directory} for the stages of evaluate.stages that have one, in that order."""
    models_dir = resolve(params.train.models_dir, root)
    found = {}
    for stage in params.evaluate.stages:
        directory = models_dir / stage
        if directory.exists():
            found[stage] = directory
        else:
            print(f"[evaluate] {stage}: no checkpoint at {directory}, skipped", flush=True)
    if not found:
        example = "fcn32s" if "fcn32s" in params.evaluate.stages else params.evaluate.stages[0]
        raise EvaluateError(
            f"no checkpoint for any of evaluate.stages ({', '.join(params.evaluate.stages)}) in {models_dir}: "
            f"train one first, e.g. {stage_command(example)}")
    return found


def format_table(report: dict, total_images: int, timing_images: int, where: str) -> str:
    """The paper's table layout: one row per stage, scores in percent to one decimal."""
    def percent(value):
        return "n/a" if value is None else f"{100 * value:.1f}"

    lines = ["| | " + " | ".join(TABLE_COLUMNS.values()) + " | forward time (ms) |",
             "|:--|" + "--:|" * (len(TABLE_COLUMNS) + 1)]
    for stage, entry in report.items():
        forward = "n/a" if entry["forward_ms"] is None else f"{entry['forward_ms']:.1f}"
        cells = [percent(entry[key]) for key in TABLE_COLUMNS] + [forward]
        lines.append(f"| {DISPLAY_NAMES.get(stage, stage)} | " + " | ".join(cells) + " |")
    timed = min(timing_images, total_images - 1)
    timing = (f"mean over {timed} val images after one warm-up image, batch 1, at their own sizes, on {where}"
              if timed > 0 else "not measured (the only val image is the warm-up)")
    return (
        "# Evaluation on val\n\n" + "\n".join(lines) + "\n\n"
        f"Scores in percent over all {total_images} val images, whole images at their own sizes, batch 1, "
        f"from one confusion matrix per network.\nForward time: {timing}.\n"
    )


def evaluate(params: Params, root: Path, device: torch.device | None = None) -> dict:
    """Score every stage that has a checkpoint, write the report and table; return the report."""
    root = Path(root).resolve()
    device = device or pick_device()
    files = val_shards(params, root)
    total = count_images(files)
    if total == 0:
        raise EvaluateError(f"{files[0].parent}: the val shards hold no image; re-run `python -m pipelines.preprocess`")
    checkpoints = find_checkpoints(params, root)
    timing_images = params.evaluate.timing_images

    report = {}
    for stage, directory in checkpoints.items():
        try:
            model, _ = load_checkpoint(directory, map_location=device)
        except (FileNotFoundError, ValueError) as err:
            raise EvaluateError(f"stage {stage}: {err}; retrain it with {stage_command(stage)}") from None
        model = optimize_for_inference(model)
        print(f"[{stage}] scoring {total} val images on {device.type}", flush=True)
        matrix, images, times = score_model(model, read_val(files), device, timing_images, total, stage)
        if matrix.total == 0:
            raise EvaluateError(f"{files[0].parent}: every val pixel is void (255): nothing to score")
        report[stage] = stage_report(matrix, images, times, device)
        entry = report[stage]
        print(f"[{stage}] " + "  ".join(f"{key} {entry[key]:.4f}" for key in SCORE_KEYS)
              + (f"  forward {entry['forward_ms']:.1f} ms/image" if entry["forward_ms"] is not None else ""),
              flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Both texts before either file: allow_nan=False makes a NaN that slipped through fail here.
    report_text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    table_text = format_table(report, total, timing_images, device_description(device))
    atomic_write_text(resolve(params.evaluate.report_file, root), report_text)
    atomic_write_text(resolve(params.evaluate.table_file, root), table_text)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml",
                        help="params file; relative paths are taken from its directory (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        report = evaluate(params, Path(args.params).resolve().parent, pick_device(args.device))
    except (ParamsError, EvaluateError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2 if isinstance(err, ParamsError) else 1
    print(f"[evaluate] {len(report)} stage(s) written to {params.evaluate.report_file} and "
          f"{params.evaluate.table_file}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
