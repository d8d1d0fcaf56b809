"""Pictures of a stage's result: the confusion matrix, IU per class, val images with predictions.

    stage_figures(checkpoint_dir, shards_dir, val_images, out_dir, stage)
        out_dir/plots/confusion_matrix.png, out_dir/plots/per_class_iu.png,
        out_dir/val_images/<id>.png (image | prediction | truth, in the VOC colours)

Matplotlib's Agg canvas, no pyplot and no display. pipelines.track.stage_runs logs what
this writes as the stage's MLflow artifacts.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fcn_models.checkpoint import META_FILE
from fcn_models.voc import names_for
from pipelines.data.shards import iter_samples, shard_files

DPI = 100


def stage_figures(checkpoint_dir: Path, shards_dir: Path, val_images: int, out_dir: Path, stage: str) -> None:
    """The plots of a checkpoint's val scores (from its meta.json) and its predictions on the
    first `val_images` val images, into out_dir/plots and out_dir/val_images."""
    import json

    meta = json.loads((Path(checkpoint_dir) / META_FILE).read_text())
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    iteration = meta["iterations"]
    plot_confusion_matrix(np.array(meta["confusion_matrix"]), plots / "confusion_matrix.png",
                          f"{stage}: confusion matrix at iteration {iteration} (rows: truth, normalised)")
    per_class = [math.nan if v is None else v for v in meta["val"]["per_class_iu"]]
    plot_per_class_iu(per_class, plots / "per_class_iu.png",
                      f"{stage}: IU per class at iteration {iteration}, mean {meta['val']['mean_iu']:.3f}")
    if val_images:
        (Path(out_dir) / "val_images").mkdir(exist_ok=True)
        write_val_images(Path(checkpoint_dir), Path(shards_dir), val_images, Path(out_dir) / "val_images")


def agg_figure(width: float, height: float):
    """A matplotlib Figure of width x height inches at DPI, on its own Agg canvas."""
    # The Agg canvas directly: no pyplot, no global backend, nothing needs a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def plot_confusion_matrix(matrix: np.ndarray, path: Path, title: str) -> None:
    """The confusion matrix, each row (true class) divided by its pixel count, as a PNG."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    names = names_for(len(matrix))
    figure = agg_figure(8.5, 7.5)
    axes = figure.add_subplot()
    image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path, format="png")


def plot_per_class_iu(per_class_iu: list[float], path: Path, title: str) -> None:
    """IU per class as horizontal bars; a class in neither truth nor prediction says n/a."""
    from fcn_models.palette import voc_colormap

    values = np.asarray(per_class_iu, dtype=np.float64)
    names = names_for(len(values))
    colours = voc_colormap(len(values)) / 255.0
    figure = agg_figure(7.0, 6.5)
    axes = figure.add_subplot()
    positions = np.arange(len(values))
    axes.barh(positions, np.nan_to_num(values), color=colours, edgecolor="black", linewidth=0.5)
    for y, v in zip(positions, values):
        axes.text(0.005 if math.isnan(v) else v + 0.005, y, "n/a" if math.isnan(v) else f"{v:.2f}",
                  va="center", fontsize=7)
    if not np.all(np.isnan(values)):
        axes.axvline(float(np.nanmean(values)), color="grey", linestyle="--", linewidth=1)
    axes.set_yticks(positions, names, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlim(0.0, 1.05)
    axes.set_xlabel("IU")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png")


def prediction_panel(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray, gap: int = 4) -> np.ndarray:
    """image | prediction over it | truth over it, side by side, in the VOC colours."""
    from fcn_models.palette import overlay

    spacer = np.full((image.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([image, spacer, overlay(image, prediction), spacer, overlay(image, truth)], axis=1)


def write_val_images(model_dir: Path, shards_dir: Path, count: int, out_dir: Path) -> list[Path]:
    """<out_dir>/<id>.png for the first `count` val images, predicted by the checkpoint in model_dir."""
    import torch
    from PIL import Image

    from fcn_models.checkpoint import load_checkpoint
    from fcn_models.preprocess import normalize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_checkpoint(model_dir)
    model.to(device).eval()
    written = []
    with torch.no_grad():
        for _, sample_id, image, label in iter_samples(shard_files(shards_dir, "val"), limit=count):
            logits = model(normalize(image, model.input_norm)[None].to(device))
            prediction = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
            path = Path(out_dir) / f"{sample_id}.png"
            Image.fromarray(prediction_panel(image, prediction, label)).save(path, format="PNG")
            written.append(path)
    return written
