"""Pictures of the whole chain, drawn by the evaluate stage: the paper's Figure 4 and the learning curves.

    figure_samples(files, count)             the first `count` val images by id: [(id, image, label)]
    predict_masks(model, samples, device)    a network's class map of each, at the image's own size
    write_figure4(samples, predictions, path)
        one row per image; columns: the image, the truth, then each network's prediction in
        the order given, class maps in the VOC colours (void in the truth in the VOC void
        colour), titled with the paper's names (val_scores.display_name)
    write_learning_curves(params, path)
        val mean IU (top) and the training loss (bottom) of every stage of evaluate.stages with
        a reports/<stage>/history.csv, against iteration, one line a stage. The stages are laid
        end to end: a stage that starts from another's checkpoint starts where that stage's
        history ends, one from ImageNet at 0, so x is the iterations trained along its chain.
    write_evaluation_figures(params, samples, predictions)
        both into evaluate.figures_dir (a picture not drawn this time is removed); the paths

Each cell of Figure 4 is CELL x CELL pixels, the picture scaled to fit it (masks by nearest
neighbour, so every pixel of a class map is a class colour), and the figure is exactly
figure4_size(rows, columns) pixels. Both files are written whole (temp file, then rename).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import torch

from fcn_models.metrics import MEAN_IU
from fcn_models.palette import colorize
from fcn_models.preprocess import normalize
from pipelines.core.files import atomic_write_bytes
from pipelines.core.params import Params
from pipelines.data.shards import SAMPLE_COLUMNS, ShardError, decode_sample, iter_rows
from pipelines.track.figures import DPI, agg_figure
from pipelines.track.metrics_log import HISTORY_CSV
from pipelines.track.val_scores import EvaluateError, display_name

FIGURE4_FILE = "figure4.png"
CURVES_FILE = "learning_curves.png"

# Figure 4's layout in pixels: square cells, PAD between them and around, a band for the titles.
CELL = 200
PAD = 6
TITLE_BAND = 28
FIRST_COLUMNS = ("image", "ground truth")
# The training loss is drawn on a log scale when its largest value is more than this many times its smallest.
LOG_SCALE_SPAN = 20


def figure_samples(files, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(id, RGB image, label) of the first `count` val images by id, in id order: chosen by
    nothing the networks do, and the same for every run on the same val split."""
    ids = sorted(str(row[0]) for _, row in iter_rows(files, ("id",)))
    wanted = set(ids[:count])
    chosen = {}
    for path, (sample_id, image_bytes, label_bytes) in iter_rows(files, SAMPLE_COLUMNS):
        if str(sample_id) in wanted:
            try:
                chosen[str(sample_id)] = decode_sample(str(sample_id), image_bytes, label_bytes)
            except ShardError as err:
                raise ShardError(f"{path}: {err}") from None
    return [(sample_id, *chosen[sample_id]) for sample_id in sorted(chosen)]


def predict_masks(model: torch.nn.Module, samples, device: torch.device) -> list[np.ndarray]:
    """The network's (H, W) uint8 class map of each sample's image, batch 1, at its own size."""
    masks = []
    with torch.inference_mode():
        for _, image, _ in samples:
            pixels = torch.from_numpy(image).permute(2, 0, 1).to(device)
            scores = model(normalize(pixels, model.input_norm)[None])
            masks.append(scores.argmax(1)[0].to("cpu", torch.uint8).numpy())
    return masks


# --------------------------------------------------------------------------- Figure 4

def figure4_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a Figure 4 of `rows` images and `columns` columns."""
    return PAD + columns * (CELL + PAD), TITLE_BAND + rows * (CELL + PAD)


def cell_origin(row: int, column: int) -> tuple[int, int]:
    """(x, y) of a cell's top left corner, in pixels from the figure's top left."""
    return PAD + column * (CELL + PAD), TITLE_BAND + row * (CELL + PAD)


def _fit(picture: np.ndarray, nearest: bool) -> np.ndarray:
    """The (H, W, 3) picture scaled to fit a CELL x CELL cell, its aspect kept."""
    from PIL import Image

    height, width = picture.shape[:2]
    scale = CELL / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(picture).resize(size, method))


def figure4_grid(samples, predictions: dict[str, list[np.ndarray]]) -> np.ndarray:
    """The figure's pixels below and beside the titles: (height, width, 3) uint8, white between
    the cells, each picture centred in its cell."""
    columns = len(FIRST_COLUMNS) + len(predictions)
    width, height = figure4_size(len(samples), columns)
    grid = np.full((height, width, 3), 255, np.uint8)
    for row, (_, image, label) in enumerate(samples):
        pictures = [(image, False), (colorize(label), True)]
        pictures += [(colorize(masks[row]), True) for masks in predictions.values()]
        for column, (picture, nearest) in enumerate(pictures):
            fitted = _fit(picture, nearest)
            x, y = cell_origin(row, column)
            x += (CELL - fitted.shape[1]) // 2
            y += (CELL - fitted.shape[0]) // 2
            grid[y:y + fitted.shape[0], x:x + fitted.shape[1]] = fitted
    return grid


def write_figure4(samples, predictions: dict[str, list[np.ndarray]], path: Path) -> Path:
    """The paper's Figure 4 for `samples` and {stage: class maps, one per sample} (columns in
    the dict's order) as a PNG at `path`."""
    grid = figure4_grid(samples, predictions)
    height, width = grid.shape[:2]
    figure = agg_figure(width / DPI, height / DPI)
    # figimage puts the pixels on the canvas as they are: no resampling of the class colours.
    figure.figimage(grid, 0, 0)
    titles = [*FIRST_COLUMNS, *(display_name(stage) for stage in predictions)]
    for column, title in enumerate(titles):
        x = cell_origin(0, column)[0] + CELL / 2
        figure.text(x / width, 1 - TITLE_BAND / 2 / height, title, ha="center", va="center", fontsize=11)
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


# --------------------------------------------------------------------------- learning curves

def read_history(path: Path) -> list[dict[str, float]]:
    """The rows of a history.csv as numbers: iteration, loss and mean IU (the columns drawn)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"iteration", "loss", MEAN_IU} - set(reader.fieldnames or ())
        if missing:
            raise EvaluateError(f"{path}: no column {', '.join(sorted(missing))}; train the stage again "
                                "to rewrite it")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append({key: float(row[key]) for key in ("iteration", "loss", MEAN_IU)})
            except (TypeError, ValueError):
                raise EvaluateError(f"{path}: line {line} is not numbers ({dict(row)}); train the stage "
                                    "again to rewrite it") from None
    return rows


def chain_start(stage: str, params: Params, histories: dict[str, list[dict]]) -> float:
    """The iteration a stage's curve starts at: the iterations trained along the chain before it
    (each earlier stage's last history row, or its configured iterations when it has no history)."""
    stages, start, seen = params.train.stages, 0.0, {stage}
    init = stages[stage].init if stage in stages else "imagenet"
    while init in stages and init not in seen:
        seen.add(init)
        start += histories[init][-1]["iteration"] if histories.get(init) else stages[init].iterations
        init = stages[init].init
    return start


def write_learning_curves(params: Params, path: Path) -> Path | None:
    """The learning curves of every stage of evaluate.stages with a history, as a PNG at `path`;
    a stage without one is left out with a line saying so; None when no stage has one."""
    histories = {}
    for stage in params.evaluate.stages:
        file = Path(params.train.reports_dir) / stage / HISTORY_CSV
        if not file.is_file():
            print(f"[evaluate] {stage}: no history at {file}, left out of the learning curves", flush=True)
            continue
        rows = read_history(file)
        if rows:
            histories[stage] = rows
        else:
            print(f"[evaluate] {stage}: {file} has no rows, left out of the learning curves", flush=True)
    if not histories:
        print(f"[evaluate] no stage has a history: no learning curves at {path}", flush=True)
        return None
    figure = agg_figure(9.0, 7.0)
    iu_axes, loss_axes = figure.subplots(2, 1, sharex=True)
    colours = {stage: f"C{i}" for i, stage in enumerate(params.evaluate.stages)}
    for stage, rows in histories.items():
        start = chain_start(stage, params, histories)
        x = [start + row["iteration"] for row in rows]
        style = dict(color=colours[stage], marker="o", markersize=3, linewidth=1.5, label=display_name(stage))
        iu_axes.plot(x, [row[MEAN_IU] for row in rows], **style)
        loss_axes.plot(x, [row["loss"] for row in rows], **style)
        if start:
            for axes in (iu_axes, loss_axes):
                axes.axvline(start, color=colours[stage], linestyle=":", linewidth=1)
    # A summed loss falls by orders of magnitude along the chain: a log scale, when it spans one.
    losses = [row["loss"] for rows in histories.values() for row in rows]
    if all(v > 0 and math.isfinite(v) for v in losses) and max(losses) > LOG_SCALE_SPAN * min(losses):
        loss_axes.set_yscale("log")
    iu_axes.set_ylabel("val mean IU")
    iu_axes.set_title("Learning curves; each stage starts where the stage it starts from ended", fontsize=10)
    iu_axes.legend(fontsize=9)
    iu_axes.grid(alpha=0.3)
    loss_axes.set_ylabel("training loss (mean since the previous validation)", fontsize=8)
    loss_axes.set_xlabel("iteration, along the chain of stages")
    loss_axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def write_evaluation_figures(params: Params, samples, predictions: dict[str, list[np.ndarray]]) -> list[Path]:
    """Figure 4 (when a stage was predicted) and the learning curves (when a stage has a
    history) into evaluate.figures_dir; the paths written."""
    directory = Path(params.evaluate.figures_dir)
    directory.mkdir(parents=True, exist_ok=True)
    # A picture not drawn this time is removed, so none is left from an earlier run's networks.
    for name in (FIGURE4_FILE, CURVES_FILE):
        (directory / name).unlink(missing_ok=True)
    written = []
    if predictions:
        written.append(write_figure4(samples, predictions, directory / FIGURE4_FILE))
        print(f"[evaluate] figure 4: val images {', '.join(s[0] for s in samples)} -> {written[-1]}", flush=True)
    else:
        print(f"[evaluate] no stage of evaluate.stages has a checkpoint: no figure 4 in {directory}", flush=True)
    curves = write_learning_curves(params, directory / CURVES_FILE)
    if curves:
        written.append(curves)
        print(f"[evaluate] learning curves -> {curves}", flush=True)
    return written
