"""What `fcn scaling-study` found: each global batch's val mean IU against images seen, over its seeds.

    summarize(runs, reference)       the study's numbers: per configuration, its schedule and its
                                     seeds' final and best mean IU (mean, sample std, min, max)
    table_lines(doc)                 the Markdown table of them (reports/scaling/<stage>.md)
    write_curves(doc, runs, path)    the PNG: mean IU against images seen, a line a configuration
                                     (the mean over its seeds) in a band (± one sample std)
    write_report(doc, runs, json_path, md_path, figure_path)   all three, each written whole

`runs` maps a configuration's label ("2x1": workers x images a worker) to what it ran:
{"global_batch", "lr", "iterations", "momentum", "beta2", "warmup_iterations", "seeds":
{seed: reports directory of the seed's stage}}. A seed's history.csv gives its validations
(x: iteration x global batch = images seen).

The comparison is at equal images seen: every configuration's schedule ends at the same
image count (train.scaling), and its final validation is its last history row. The reference
configuration (batch 1 whole images, one worker, as the paper) sets the spread every other
one is held to: its seeds' lowest and highest final mean IU.
"""
from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

from fcn_models.metrics import MEAN_IU
from pipelines.core.files import atomic_write_bytes, atomic_write_text
from pipelines.track.chain_figures import read_history
from pipelines.track.figures import agg_figure
from pipelines.track.metrics_log import HISTORY_CSV
from pipelines.track.val_scores import EvaluateError


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def _seed_rows(directory: Path) -> list[dict[str, float]]:
    rows = read_history(Path(directory) / HISTORY_CSV)
    if not rows:
        raise EvaluateError(f"{Path(directory) / HISTORY_CSV}: no validation row; train the seed again")
    return rows


def summarize(runs: dict[str, dict], reference: str) -> dict:
    """Per configuration: its schedule, each seed's final and best val mean IU, their spread,
    the images seen, and the final mean's difference from the reference configuration's."""
    configs = {}
    for label, run in runs.items():
        finals, bests, images = {}, {}, set()
        for seed, directory in run["seeds"].items():
            rows = _seed_rows(directory)
            finals[seed], bests[seed] = rows[-1][MEAN_IU], max(row[MEAN_IU] for row in rows)
            images.add(int(rows[-1]["iteration"]) * run["global_batch"])
        configs[label] = {
            **{key: run[key] for key in ("global_batch", "lr", "iterations", "momentum", "beta2",
                                         "warmup_iterations")},
            "images_seen": sorted(images),
            "final": {"per_seed": finals, **_stats(list(finals.values()))},
            "best": {"per_seed": bests, **_stats(list(bests.values()))},
        }
    ref = configs[reference]["final"]
    for entry in configs.values():
        final = entry["final"]
        final["minus_reference"] = final["mean"] - ref["mean"]
        final["within_reference_range"] = ref["min"] <= final["mean"] <= ref["max"]
    return {"reference": reference, "configs": configs}


def _pm(stats: dict) -> str:
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def table_lines(doc: dict) -> list[str]:
    """The study as a Markdown table, mean IU in percent (mean ± sample std over the seeds)."""
    ref = doc["configs"][doc["reference"]]["final"]
    lines = [
        "| workers x images | global batch | lr | beta1 / momentum | steps | warm-up steps | images seen "
        "| final mean IU | best mean IU | final - reference | inside the reference's seeds |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|:--|",
    ]
    for label, entry in doc["configs"].items():
        final = entry["final"]
        inside = ("(reference: " f"{100 * ref['min']:.1f} to {100 * ref['max']:.1f})" if label == doc["reference"]
                  else "yes" if final["within_reference_range"] else "no")
        images = ", ".join(f"{n:,}" for n in entry["images_seen"])
        lines.append(f"| {label} | {entry['global_batch']} | {entry['lr']:.3g} | {entry['momentum']:.3g} "
                     f"| {entry['iterations']} | {entry['warmup_iterations']} | {images} | {_pm(final)} "
                     f"| {_pm(entry['best'])} | {100 * final['minus_reference']:+.1f} | {inside} |")
    return lines


def write_curves(doc: dict, runs: dict[str, dict], path: Path) -> Path:
    """Val mean IU against images seen: each configuration's mean over its seeds, ± one sample std."""
    figure = agg_figure(8.0, 5.0)
    axes = figure.add_subplot()
    for number, (label, run) in enumerate(runs.items()):
        by_images: dict[int, list[float]] = {}
        for directory in run["seeds"].values():
            for row in _seed_rows(directory):
                by_images.setdefault(int(row["iteration"]) * run["global_batch"], []).append(row[MEAN_IU])
        x = sorted(by_images)
        mean = [100 * statistics.fmean(by_images[n]) for n in x]
        std = [100 * (statistics.stdev(by_images[n]) if len(by_images[n]) > 1 else 0.0) for n in x]
        colour = f"C{number}"
        entry = doc["configs"][label]
        axes.plot(x, mean, color=colour, marker="o", markersize=3,
                  label=f"{label} (batch {entry['global_batch']}, lr {entry['lr']:.3g}, {len(run['seeds'])} seeds)")
        axes.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                          color=colour, alpha=0.15, linewidth=0)
    axes.set_xlabel("images seen")
    axes.set_ylabel("val mean IU (%)")
    axes.set_title("The same images at every global batch (train.scaling): mean over seeds ± one std",
                   fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def write_report(doc: dict, runs: dict[str, dict], json_path: Path, md_path: Path, figure_path: Path) -> None:
    """The numbers as JSON, the table as Markdown and the curves as a PNG, each written whole."""
    for path in (json_path, md_path, figure_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(json_path), json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic_write_text(Path(md_path), "\n".join(table_lines(doc)) + "\n")
    write_curves(doc, runs, figure_path)
