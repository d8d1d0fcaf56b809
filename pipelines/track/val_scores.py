"""Scoring a network on val as the paper scores it: one confusion matrix over every image.

    score_model(model, samples, device, timing_images)  -> (ConfusionMatrix, images, forward times)
    stage_report(matrix, images, times, device)          -> the JSON entry of one network
    score_checkpoint(directory, key, files, ...)         -> that entry for a checkpoint, on the val shards
    format_table(report, ...)                            -> the paper's table layout in Markdown

Each image is scored at its own size, batch 1, no augmentation; the per-pixel argmax
is counted into one confusion matrix over the whole split (rows = truth, void pixels
skipped), which gives the four scores and the IU of each class (fcn_models.metrics).
Forward time is the mean over `timing_images` images after one warm-up image, the
forward pass alone (the device synchronised around it on a GPU).
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from fcn_models.checkpoint import FIXED_SUFFIX, MODEL_FILE, load_checkpoint, stage_network
from fcn_models.errors import FCNError
from fcn_models.fcn import VARIANTS, optimize_for_inference
from fcn_models.limits import MAX_PIXELS, too_large
from fcn_models.metrics import SCORE_HEADINGS, SCORE_KEYS, ConfusionMatrix, stride_ceiling_maps
from fcn_models.preprocess import normalize
from fcn_models.published import CONVERTED, NAMES, PAPER, REFERENCE
from fcn_models.reference import reference_network
from fcn_models.summary import cpu_model, machine
from fcn_models.voc import names_for
from pipelines.core.files import file_sha256
from pipelines.data.shards import iter_samples

# Report keys of the reference's released models, scored beside ours: "reference-fcn8s".
REFERENCE_PREFIX = "reference-"
PROGRESS_EVERY = 100


def expected_network(key: str) -> dict:
    """What the checkpoint behind a report key must hold, as read_meta's keyword arguments:
    a stage's network, or for "reference-<name>" the network the reference's name says."""
    if key.startswith(REFERENCE_PREFIX):
        return reference_network(key[len(REFERENCE_PREFIX):])
    variant = stage_network(key)
    if variant is None:
        raise EvaluateError(f"report key {key!r} names no network: a stage is named after one of "
                            f"{', '.join(VARIANTS)} (optionally with '{FIXED_SUFFIX}'), a reference after "
                            f"'{REFERENCE_PREFIX}<name>'")
    return {"variant": variant}


class EvaluateError(FCNError, RuntimeError):
    """Evaluation that cannot run as configured; the message names the file and what to do."""


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
                total: int | None = None, name: str = "model",
                max_pixels: int = MAX_PIXELS) -> tuple[ConfusionMatrix, int, list[float]]:
    """Run `model` (in eval mode, on `device`) over (shard, id, image, label) samples.

    Returns the confusion matrix over all of them, the number of images, and the
    forward times in seconds of images 2 .. timing_images + 1 (the first is the warm-up).
    An image of more than max_pixels pixels is an EvaluateError, before the network sees it.
    """
    matrix = ConfusionMatrix(model.num_classes)
    times: list[float] = []
    start, images = time.perf_counter(), 0
    with torch.inference_mode():
        for index, (path, sample_id, image, label) in enumerate(samples):
            why = too_large(image.shape[0], image.shape[1], max_pixels)
            if why:
                raise EvaluateError(f"{path}: sample {sample_id}: {why} (inference.max_pixels): raise the limit "
                                    "if this machine has the memory, or leave the image out of val")
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
                raise EvaluateError(f"{path}: sample {sample_id}: {err}; re-run `fcn preprocess`") \
                    from None
            images += 1
            if images % PROGRESS_EVERY == 0:
                rate = images / max(time.perf_counter() - start, 1e-9)
                print(f"[{name}] {images}/{total if total is not None else '?'} images  {rate:.1f} images/s",
                      flush=True)
    return matrix, images, times


# The output strides of FCN-32s, -16s and -8s, whose ceilings the table shows.
CEILING_STRIDES = (32, 16, 8)


def stride_ceilings(samples, num_classes: int, strides=CEILING_STRIDES) -> dict[int, dict]:
    """{stride: the four scores} of the val labels reduced to each output stride and brought
    back (fcn_models.metrics.stride_ceiling): the best an output of that stride can score."""
    matrices = {s: ConfusionMatrix(num_classes) for s in strides}
    for _, _, _, label in samples:
        truth = torch.from_numpy(label)
        for stride, ceiling in stride_ceiling_maps(truth, strides, num_classes).items():
            matrices[stride].update(ceiling, truth)
    return {s: {k: _finite_or_none(m.scores()[k]) for k in SCORE_KEYS} for s, m in matrices.items()}


def _finite_or_none(value: float):
    return None if value is None or math.isnan(value) else value


def stage_report(matrix: ConfusionMatrix, images: int, times: list[float], device: torch.device) -> dict:
    """The JSON entry of one stage: four scores, per-class IU by name, images, forward time."""
    scores = matrix.scores()
    names = names_for(matrix.num_classes)
    return {
        **{key: _finite_or_none(scores[key]) for key in SCORE_KEYS},
        "per_class_iu": {name: _finite_or_none(iu) for name, iu in zip(names, scores["per_class_iu"])},
        "images": images,
        "forward_ms": 1000 * statistics.fmean(times) if times else None,
        "forward_ms_median": 1000 * statistics.median(times) if times else None,
        "timed_images": len(times),
        "device": device.type,
    }


def score_checkpoint(directory: Path, key: str, files: list[Path], total: int, device: torch.device,
                     timing_images: int, max_pixels: int, remake: str, also=None) -> dict:
    """The report entry (stage_report) of the checkpoint in `directory`, which must hold the
    network of report key `key`, scored on every sample of the val shard `files` (`total` of
    them), with its weights' sha256 and the MLflow run and iteration its meta.json names.
    remake: how to make the checkpoint again, for the message when it cannot be loaded;
    also(model): called with the loaded network before it is freed (one load for more uses)."""
    try:
        model, meta = load_checkpoint(directory, map_location=device, **expected_network(key))
    except (FileNotFoundError, ValueError, FCNError) as err:
        raise EvaluateError(f"stage {key}: {err}; {remake}") from None
    model = optimize_for_inference(model)
    print(f"[{key}] scoring {total} val images on {device.type}", flush=True)
    matrix, images, times = score_model(model, iter_samples(files), device, timing_images, total, key, max_pixels)
    if matrix.total == 0:
        raise EvaluateError(f"{files[0].parent}: every val pixel is void (255): nothing to score")
    entry = stage_report(matrix, images, times, device)
    entry["weights_sha256"] = file_sha256(Path(directory) / MODEL_FILE)
    entry["mlflow_run_id"] = meta.get("mlflow_run_id")
    entry["iterations"] = meta.get("iterations")
    if also is not None:
        also(model)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} (host: {cpu_model()})"
    return machine()


def reference_key(name: str) -> str:
    """The report key of a reference model."""
    return REFERENCE_PREFIX + name


def display_name(key: str) -> str:
    """A report key as a row name: "FCN-8s", or "FCN-8s (reference's weights)"."""
    if key.startswith(REFERENCE_PREFIX):
        name = key[len(REFERENCE_PREFIX):]
        return f"{NAMES.get(name, name)} (reference's weights)"
    return NAMES.get(key, key)


def published_rows(keys) -> list[str]:
    """Table rows of the published numbers for the networks in the report (in percent)."""
    rows = []
    for key in keys:
        if key.startswith(REFERENCE_PREFIX):
            name = key[len(REFERENCE_PREFIX):]
            if name in CONVERTED:
                rows.append((f"{display_name(key)}: converted weights, as the Chainer port scores them",
                             [f"{v:.2f}" for v in CONVERTED[name]]))
            if name in REFERENCE:
                rows.append((f"{display_name(key)}: the reference's README", ["", "", f"{REFERENCE[name]:.1f}", ""]))
        elif key in PAPER:
            rows.append((f"{display_name(key)}: the paper, Table 3", [f"{v:.1f}" for v in PAPER[key]]))
    return [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]


def format_table(report: dict, total_images: int, timing_images: int, where: str,
                 ceilings: dict[int, dict] | None = None,
                 spreads: dict[str, tuple[str, list[str]]] | None = None) -> str:
    """The paper's table layout: one row per network, scores in percent to one decimal, under a
    network its spread over training seeds where `spreads` has one ({key: (what the row is, its
    cells)}: pipelines.track.seed_spread.table_row); then what each output stride allows on the
    same images (ceilings), and the published numbers of the same networks, for comparison."""
    def percent(value):
        return "n/a" if value is None else f"{100 * value:.1f}"

    header = "| | " + " | ".join(SCORE_HEADINGS.values())
    lines = [header + " | forward time (ms) |", "|:--|" + "--:|" * (len(SCORE_HEADINGS) + 1)]
    for key, entry in report.items():
        forward = "n/a" if entry["forward_ms"] is None else f"{entry['forward_ms']:.1f}"
        cells = [percent(entry[k]) for k in SCORE_HEADINGS] + [forward]
        lines.append(f"| {display_name(key)} | " + " | ".join(cells) + " |")
        if spreads and key in spreads:
            what, spread_cells = spreads[key]
            lines.append(f"| {display_name(key)}, {what} | " + " | ".join(spread_cells) + " | |")
    timed = min(timing_images, total_images - 1)
    timing = (f"mean over {timed} val images after one warm-up image, batch 1, at their own sizes, on {where}"
              if timed > 0 else "not measured (the only val image is the warm-up)")
    text = (
        "# Evaluation on val\n\n" + "\n".join(lines) + "\n\n"
        f"Scores in percent over all {total_images} val images, whole images at their own sizes, batch 1, "
        f"from one confusion matrix per network.\nForward time: {timing}.\n"
    )
    if spreads and any(key in spreads for key in report):
        text += ("A row \"K seeds, mean ± std\" is the mean and sample standard deviation of the stage's scores "
                 "over K trainings that differ only in train.seed, each from the same starting weights "
                 "(`fcn seeds`); the row above it is the pipeline's own checkpoint.\n")
    if ceilings:
        rows = [f"| labels at stride {stride}, back to full size | "
                + " | ".join(percent(scores[k]) for k in SCORE_HEADINGS) + " |" for stride, scores in ceilings.items()]
        text += ("\n## What an output stride allows (the same val images)\n\n"
                 + header + " |\n|:--|" + "--:|" * len(SCORE_HEADINGS) + "\n" + "\n".join(rows) + "\n\n"
                 "Each val label map reduced to one class share per stride x stride cell and brought back "
                 "bilinearly, as the networks' upsampling does: no network whose scores live on that grid "
                 "(FCN-32s: 32, FCN-16s: 16, FCN-8s: 8) can do better.\n")
    published = published_rows(report)
    if published:
        text += ("\n## Published, for comparison (seg11valid, 736 images, the full-size networks)\n\n"
                 + header + " |\n|:--|" + "--:|" * len(SCORE_HEADINGS) + "\n" + "\n".join(published) + "\n")
    return text
