"""Batch inference on Ray Data: many images in; masks, overlays and a table of class shares out.

    list_inputs(source)                      what a directory, a glob or Parquet files hold, named
    check_checkpoint(checkpoint)             loaded once on the driver: BatchError naming a broken file
    run_batch(inputs, checkpoint, out_dir, ...)  the Ray Data job; returns the summary rows

The job: the inputs as a dataset (file paths, or Parquet rows of encoded images) ->
map_batches(Segmenter) on an actor pool, one actor per GPU with ray.use_gpu, else CPU
actors of a few torch threads each -> per image <out>/<name>_mask.png (palette PNG,
pixel values are class ids) and <name>_overlay.png, written by the actor that
segmented it, and a summary row. The driver gathers the rows into
<out>/summary.parquet: one row per image with its size, files, the share of pixels
of every class (share_<class>, percent) and, for an image that failed (unreadable,
not an image, refused by serving.check_image, a Parquet `image` that is not bytes, a
name no file can have, a failed write), its error instead; the others are written all
the same. A Parquet row is data: its `image` is never opened as a path. The actors read the weights from Ray's object store, so the
job runs the same on a local Ray, through `ray job submit` and on a cluster (where
the inputs and the output directory must be on storage every node reaches).
"""
from __future__ import annotations

import glob
import tempfile
from pathlib import Path

import numpy as np

from fcn_models.checkpoint import META_FILE, MODEL_FILE
from fcn_models.errors import FCNError
from fcn_models.outputs import make_dirs
from fcn_models.voc import class_names
from pipelines.serve.images import MASK_SUFFIX, OVERLAY_SUFFIX, written_paths

# Files a directory or glob contributes (lower-case suffixes).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
SUMMARY_FILE = "summary.parquet"
# Images one actor call handles: few, so that a failed image costs little and actors stay busy.
BATCH_ROWS = 4
SHARE_PREFIX = "share_"
# The longest file name most file systems take, in bytes.
NAME_MAX = 255
# The longer of the two files an image writes: <name>_overlay.png.
LONGEST_SUFFIX = max(MASK_SUFFIX, OVERLAY_SUFFIX, key=len)


class BatchError(FCNError, RuntimeError):
    """Inputs or outputs that cannot be used; the message names them and says what to do."""


def list_inputs(source: str) -> dict:
    """{"kind": "files", "items": [(name, path)]} for a directory (recursive) or a glob of images,
    or {"kind": "parquet", "items": [(file, row group, [names])]} for Parquet files of encoded
    images (an "image" column of bytes, names from an "id" column, else file stem and row
    number). Names are unique and become the output files' names (without the suffix)."""
    path = Path(source)
    if path.suffix == ".parquet" or (glob.has_magic(source) and source.endswith(".parquet")):
        files = sorted(Path(p) for p in glob.glob(source)) if glob.has_magic(source) else [path]
        return _parquet_inputs(source, files)
    if path.is_dir():
        root = path
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif glob.has_magic(source):
        root = Path(source.split("*")[0].split("?")[0].split("[")[0] or ".")
        root = root if root.is_dir() else root.parent
        found = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    else:
        raise BatchError(f"{source}: no such directory (give a directory of images, a glob such as "
                         "'photos/*.jpg', or a .parquet file with an 'image' column)")
    if not found:
        raise BatchError(f"{source}: holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    items, names = [], {}
    for file in found:
        name = str(file.relative_to(root).with_suffix("")) if file.is_relative_to(root) else file.stem
        if name in names:
            raise BatchError(f"{names[name]} and {file} would both write {name}{MASK_SUFFIX}: rename one, or "
                             "predict them in separate runs")
        names[name] = file
        items.append((name, str(file.resolve())))
    return {"kind": "files", "items": items}


def _parquet_inputs(source: str, files: list[Path]) -> dict:
    import pyarrow.parquet as pq

    if not files or not all(f.is_file() for f in files):
        raise BatchError(f"{source}: no such Parquet file")
    items, names = [], []
    for file in files:
        parquet = pq.ParquetFile(file)
        if "image" not in parquet.schema_arrow.names:
            raise BatchError(f"{file}: no 'image' column (Parquet input needs the encoded images as bytes in "
                             f"'image', and names in 'id'; it has {', '.join(parquet.schema_arrow.names)})")
        for group in range(parquet.num_row_groups):
            if "id" in parquet.schema_arrow.names:
                ids = [str(v) for v in parquet.read_row_group(group, columns=["id"]).column("id").to_pylist()]
            else:
                ids = [f"{file.stem}-{len(names) + i:06d}" for i in range(parquet.metadata.row_group(group).num_rows)]
            items.append((str(file.resolve()), group, ids))
            names += ids
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})[:3]
        raise BatchError(f"{source}: ids {', '.join(twice)} occur more than once; each names its output files")
    return {"kind": "parquet", "items": items}


def name_problem(name: str, kind: str) -> str | None:
    """None when `name` can name the output files of an image, else why not. A Parquet id is one
    file name (no '/', no leading '.'); a file's name is its path under the input directory."""
    if "\0" in name:
        return "holds a NUL byte"
    if kind == "parquet" and (not name or "/" in name or name.startswith(".")):
        return "cannot name an output file (no '/', no leading '.', not empty)"
    longest = max(len(part.encode("utf-8", "surrogateescape")) for part in name.split("/")) + len(LONGEST_SUFFIX)
    if longest > NAME_MAX:
        return f"makes a file name of {longest} bytes, more than the {NAME_MAX} a file name can have"
    return None


class Segmenter:
    """The actor of the pool: decode, segment, write the two PNGs, return a summary row per image."""

    def __init__(self, weights, out_dir: str, alpha: float, threads: int, use_gpu: bool,
                 max_pixels: int | None = None):
        import ray
        import torch

        from pipelines.serve.pyfunc_model import FCNSegmenter

        if not use_gpu:
            torch.set_num_threads(max(1, threads))
        files = ray.get(weights[0])
        # The copy is needed only while loading: gone when this returns or fails.
        with tempfile.TemporaryDirectory(prefix="fcn-batch-") as scratch:
            for name, data in files.items():
                Path(scratch, name).write_bytes(data)
            self.model = FCNSegmenter().load(scratch, device="cuda" if use_gpu else "cpu", max_pixels=max_pixels)
        self.out_dir, self.alpha = Path(out_dir), alpha
        self.num_classes = self.model.model.num_classes

    def __call__(self, batch: dict) -> dict:
        rows = {"name": [], "height": [], "width": [], "mask": [], "overlay": [], "error": [], "shares": []}
        for row in self.rows(batch):
            for key in rows:
                rows[key].append(row[key])
        rows["shares"] = np.asarray(rows["shares"], dtype=np.float64).reshape(len(rows["name"]), self.num_classes)
        return rows

    def rows(self, batch: dict):
        """A summary row per image: files by path, or Parquet row groups read here (no read
        tasks to compete with the actors for CPUs), a few rows at a time."""
        if "path" in batch:
            for name, path in zip(batch["name"], batch["path"]):
                yield self.one(str(name), Path(str(path)), str(path), "files")
            return
        import pyarrow.parquet as pq

        for file, group, names in zip(batch["file"], batch["row_group"], batch["names"]):
            names = iter(names)
            for chunk in pq.ParquetFile(str(file)).iter_batches(batch_size=BATCH_ROWS, row_groups=[int(group)],
                                                               columns=["image"]):
                for data in chunk.column("image").to_pylist():
                    name = str(next(names))
                    # Errors name the Parquet row by its id.
                    yield self.one(name, data, f"{file} id {name!r}", "parquet")

    def one(self, name: str, data, label: str, kind: str) -> dict:
        """The summary row of one image: its files and class shares, or the reason it failed
        (unreadable, refused, a name no file can have, a write that failed)."""
        from PIL import Image

        from fcn_models import palette
        from pipelines.serve.images import (
            ImageError,
            decode_image,
            mask_image,
            save_png,
        )

        def failed(why: str) -> dict:
            return {"name": name, "height": -1, "width": -1, "mask": "", "overlay": "", "error": why,
                    "shares": [np.nan] * self.num_classes}

        why = name_problem(name, kind)
        if why:
            return failed(f"{label}: the name {why}")
        # A Parquet row is data: encoded bytes, never a path to open.
        if not isinstance(data, (bytes, Path)):
            return failed(f"{label}: the image column holds {type(data).__name__}, not an encoded image's bytes "
                          "(put the file's bytes in 'image', not its path)")
        try:
            image = decode_image(data, label, self.model.max_pixels, "scale it down first")
            mask = self.model.segment(image)
        except (ImageError, ValueError, OSError, RuntimeError) as err:
            return failed(str(err))
        mask_path, overlay_path = written_paths(self.out_dir, name)
        try:
            save_png(mask_image(mask), mask_path)
            save_png(Image.fromarray(palette.overlay(image, mask, self.alpha)), overlay_path)
        except (OSError, ValueError) as err:
            mask_path.unlink(missing_ok=True)
            return failed(f"{label}: cannot write {mask_path.name} or {overlay_path.name}: {err}")
        counts = np.bincount(mask.ravel(), minlength=self.num_classes)
        return {"name": name, "height": int(mask.shape[0]), "width": int(mask.shape[1]), "mask": str(mask_path),
                "overlay": str(overlay_path), "error": "", "shares": list(100.0 * counts / mask.size)}


def check_checkpoint(checkpoint: Path) -> None:
    """Load the checkpoint once here, so that a broken one fails before Ray starts, in one line
    naming its file, not as a traceback from every actor."""
    import pickle

    from pipelines.serve.pyfunc_model import FCNSegmenter

    try:
        FCNSegmenter().load(checkpoint, device="cpu")
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        raise BatchError(f"model {checkpoint}: {err}") from None


def actor_plan(use_gpu: bool, actors: int | None, cpus_per_actor: float, images: int) -> dict:
    """How many actors and what each takes: one per GPU (or `actors`), else `actors` or as many
    CPU actors as the cluster's CPUs hold; never more than there are images."""
    import ray

    resources = ray.cluster_resources()
    if use_gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise BatchError("ray.use_gpu is true but the Ray cluster has no GPU: set it false, or join a "
                             "cluster with GPUs (ray.address)")
        count = actors or gpus
        return {"actors": max(1, min(count, images)), "num_gpus": 1, "num_cpus": 1, "threads": 1}
    count = actors or max(1, int(resources.get("CPU", 1) // cpus_per_actor))
    return {"actors": max(1, min(count, images)), "num_gpus": 0, "num_cpus": cpus_per_actor,
            "threads": max(1, int(cpus_per_actor))}


def run_batch(inputs: dict, checkpoint: Path, out_dir: Path, use_gpu: bool = False, actors: int | None = None,
              cpus_per_actor: float = 1.0, alpha: float = 0.5, max_pixels: int | None = None) -> list[dict]:
    """Segment every input on an actor pool (connected Ray needed); write the PNGs and the
    summary Parquet; return the summary rows (failed ones with their error).

    max_pixels: the largest image segmented (default: the limit the model was registered with)."""
    import ray
    from ray.data import ActorPoolStrategy

    out_dir = make_dirs(out_dir, f"--out {out_dir}")
    if inputs["kind"] == "files":
        ds = ray.data.from_items([{"name": n, "path": p} for n, p in inputs["items"]])
        batch_rows = BATCH_ROWS
    else:
        ds = ray.data.from_items([{"file": f, "row_group": g, "names": n} for f, g, n in inputs["items"]])
        batch_rows = 1  # one row group a call
    count = len(inputs["items"])
    plan = actor_plan(use_gpu, actors, cpus_per_actor, count)
    weights = ray.put({name: (Path(checkpoint) / name).read_bytes() for name in (MODEL_FILE, META_FILE)})
    ds = ds.map_batches(
        Segmenter, batch_size=batch_rows, batch_format="numpy", compute=ActorPoolStrategy(size=plan["actors"]),
        num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"],
        # A list, so that Ray hands the reference itself to the actor, which reads it once.
        fn_constructor_kwargs={"weights": [weights], "out_dir": str(out_dir.resolve()), "alpha": alpha,
                               "threads": plan["threads"], "use_gpu": use_gpu, "max_pixels": max_pixels},
    )
    rows = []
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        for i in range(len(batch["name"])):
            rows.append({k: batch[k][i] for k in ("name", "height", "width", "mask", "overlay", "error", "shares")})
    rows.sort(key=lambda r: str(r["name"]))
    write_summary(rows, out_dir / SUMMARY_FILE)
    return rows


def write_summary(rows: list[dict], path: Path) -> None:
    """The summary table as Parquet, written all or nothing: one row per image, share_<class> in percent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.core.files import atomic_write_bytes

    num_classes = len(rows[0]["shares"]) if rows else len(class_names())
    names = class_names()
    columns = {
        "image": [str(r["name"]) for r in rows],
        "height": pa.array([int(r["height"]) if r["height"] >= 0 else None for r in rows], pa.int32()),
        "width": pa.array([int(r["width"]) if r["width"] >= 0 else None for r in rows], pa.int32()),
        "mask": [str(r["mask"]) or None for r in rows],
        "overlay": [str(r["overlay"]) or None for r in rows],
        "error": [str(r["error"]) or None for r in rows],
    }
    for c in range(num_classes):
        label = names[c] if c < len(names) else f"class_{c}"
        columns[SHARE_PREFIX + label] = pa.array([None if r["error"] else float(r["shares"][c]) for r in rows],
                                                 pa.float64())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
