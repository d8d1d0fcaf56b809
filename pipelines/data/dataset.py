"""Ray Data input pipeline, defined on the driver: Parquet shards -> decoded, augmented uint8 samples.

    train: epoch plan of row slices -> read tasks -> map_batches(DecodeAugment) -> (worker) local shuffle
    val:   read_parquet -> map_batches(DecodeAugment, augmentation off)

`build_datasets(params)` builds both on the driver (connected to Ray already:
this module never connects, pipelines.train.cluster does); `training_datasets(...)` is what
a training run gives the TorchTrainer (the train dataset as a factory Ray Train calls
at every worker-group start), `data_config(params)` its `dataset_config`. Inside each
training worker, pipelines.data.batches turns a worker's shards into torch batches.

This module imports no torch: Ray Data's own processes (the split coordinators and the
decode actors) and Ray Train's controller unpickle what it defines, so they import it, and every such process would pay for importing torch at each stage's
start (docs/RESULTS.md, "A recorded run"). Only the training decode actors load torch,
through albumentations.

Epochs: one execution of the train dataset holds every epoch a run needs. Ray Data
starts its decode actors once per execution, new processes importing torch and
albumentations (2-6 s on 2 loaded cores), so an execution per epoch paid that at
every epoch. The train dataset is a plan made on the driver: for each epoch, the
shards' row slices (SLICE_ROWS rows) in an order seeded from (train.seed, epoch),
each slice tagged with its epoch; read tasks turn slices into rows, and the decode
actors augment each row for its own epoch. The plan covers the steps the run has
left plus a spare epoch (`train_epochs`), since the equal split between workers may
drop a few rows of each; a worker whose batches still ran out would stop the stage
with a message saying so (pipelines.train.loop.run), never quietly start the plan again.

Resuming: a run resumed after iteration I (from its checkpoint) starts its plan at
`resume_epoch(params, rows, I)`, the epoch iteration I + 1 falls in, from that epoch's
first slice. The factory reads I from the run's latest registered checkpoint, the
one the workers restore, so a worker group restarted after a failure does not
replay epoch 0; every row carries the I its plan was made for, and the worker warns
when that is not the iteration it resumed from.

Randomness: each sample's augmentation is drawn from (train.seed, epoch, sample id),
so it does not depend on which process handles the sample, yet every worker and
epoch sees different crops and flips. Order: slices in a seeded random order, new
each epoch, then a seeded shuffle buffer of SHUFFLE_BUFFER_ROWS decoded samples in
each worker (pipelines.data.batches; it mixes across an epoch boundary too). Nothing waits for a whole split
to be read: a full random_shuffle or Ray's block shuffle would (on 2 cores, 4.5-5.5 s
before the first batch for 1,600 VOC-size images, against 1-1.5 s to read them).

CPUs: the training workers reserve ray.num_workers x ray.cpus_per_worker; Ray Data
gets ray.data_cpus, shared between the train and val pipelines (validation runs
while the train pipeline is paused) and within each between the decode actors and the
Parquet read tasks, and is capped there through its execution options. Nothing in
the pipeline asks for a CPU a training worker holds, so it cannot wait forever.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import cv2
import numpy as np
import ray
import ray.data
from ray.data import (
    ActorPoolStrategy,
    DataContext,
    ExecutionOptions,
    ExecutionResources,
    TaskPoolStrategy,
)
from ray.train import DataConfig

from fcn_models.norms import InputNorm
from fcn_models.voc import VOID
from pipelines.core.params import Params, RayParams, input_norm
from pipelines.data.shards import (
    SAMPLE_COLUMNS,
    ShardError,
    count_rows,
    decode_sample,
    shard_files,
)

# albumentations asks PyPI for a newer version when first imported (in build_augmentation,
# so in every decode actor); the pipeline must not touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

log = logging.getLogger(__name__)

# Columns the pipeline reads; source, height and width stay on disk.
READ_COLUMNS = list(SAMPLE_COLUMNS)
# Rows per DecodeAugment call: small enough that a batch of 512 x 512 crops is a few
# MB of object store, large enough that Ray's per-call overhead is noise.
DECODE_BATCH_ROWS = 16
# Share of ray.data_cpus for the val pipeline, and of each pipeline's CPUs for reading
# Parquet: read tasks move bytes and barely compute, but each needs some CPU to be
# scheduled at all. The rest goes to the decode actors.
VAL_CPU_SHARE = 0.2
IO_CPU_SHARE = 0.2
# Parquet reads at once within a pipeline's read slice: reading is I/O and copying
# more than compute, so a few overlap well.
PARALLEL_READS = 4
# Rows of one slice of the train plan, the unit of the per-epoch order: two decode
# calls. A slice is read from its row group (8 MB in preprocess's shards), so smaller
# slices would read the same row group more often.
SLICE_ROWS = 2 * DECODE_BATCH_ROWS
READ_TASKS = 1


class DatasetError(ShardError):
    """Shards that cannot feed training; the message names the path and the fix."""


# --------------------------------------------------------------------------- decode + augment

def mean_colour(norm: InputNorm) -> tuple[int, int, int]:
    """The normalisation's mean as an RGB 0-255 pixel: padding with it feeds the net zeros."""
    mean = [m / norm.scale for m in norm.mean]
    return tuple(int(round(v)) for v in (mean[::-1] if norm.bgr else mean))


def build_augmentation(params: Params):
    """The training augmentation, all of it from params.

    Random rescale (labels nearest-neighbour: class indices must never blend), then in
    batch mode "crops" a pad to augment.crop_size (image with the mean colour, label
    with 255 so the padding is ignored) and a random crop, then a horizontal flip.
    Batch mode "whole" keeps the rescaled image whole.
    """
    import albumentations as A

    aug = params.augment
    steps = []
    if (aug.scale_min, aug.scale_max) != (1.0, 1.0):
        # RandomScale draws its factor from 1 + scale_limit.
        steps.append(A.RandomScale(scale_limit=(aug.scale_min - 1.0, aug.scale_max - 1.0),
                                   interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    if params.train.batch_mode == "crops":
        size = aug.crop_size
        steps.append(A.PadIfNeeded(min_height=size, min_width=size, position="top_left",
                                   border_mode=cv2.BORDER_CONSTANT, fill=mean_colour(input_norm(params)),
                                   fill_mask=VOID))
        steps.append(A.RandomCrop(height=size, width=size))
    if aug.hflip > 0:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    return A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)


def sample_seed(seed: int, epoch: int, sample_id: str) -> int:
    """A 64-bit seed from (run seed, epoch, sample id), the same in every process.

    Python's hash() of a string differs between processes, so the id is hashed with blake2b.
    """
    id_key = int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "little")
    words = np.random.SeedSequence([seed % 2**64, epoch, id_key]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """A batch column: one stacked array when every sample has the same shape, else
    an object array of arrays, which Ray Data stores as a variable-shaped tensor."""
    if all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        column[i] = a
    return column


class DecodeAugment:
    """map_batches callable: shard rows -> {"id", "epoch", "image" uint8 RGB, "label" uint8, ...}.

    Ray Data builds one per actor, so the albumentations pipeline is built once per
    process. With augment=False (validation) it only decodes, keeping each image's size.
    Each row is augmented for its "epoch" column (the train plan's rows have one);
    rows without it for `epoch`. Columns other than id, image and label pass through.
    """

    def __init__(self, params: Params, augment: bool, epoch: int = 0):
        self.seed = params.train.seed
        self.epoch = epoch
        self.transform = build_augmentation(params) if augment else None
        # Each actor owns a slice of a CPU; OpenCV's own thread pool would oversubscribe it.
        cv2.setNumThreads(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["id"])
        epochs = np.asarray(batch["epoch"], dtype=np.int64) if "epoch" in batch else np.full(rows, self.epoch)
        images, labels = [], []
        for sample_id, epoch, image_bytes, label_bytes in zip(batch["id"], epochs, batch["image"], batch["label"]):
            image, label = decode_sample(str(sample_id), image_bytes, label_bytes)
            if self.transform is not None:
                self.transform.set_random_seed(sample_seed(self.seed, int(epoch), str(sample_id)))
                out = self.transform(image=image, mask=label)
                image, label = out["image"], out["mask"]
            images.append(np.ascontiguousarray(image))
            labels.append(np.ascontiguousarray(label))
        passed = {name: np.asarray(column) for name, column in batch.items()
                  if name not in ("id", "epoch", "image", "label")}
        return {"id": np.asarray(batch["id"]), "epoch": epochs, **passed,
                "image": _column(images), "label": _column(labels)}


# --------------------------------------------------------------------------- datasets (driver)

def data_resources(ray_params: RayParams) -> dict:
    """How ray.data_cpus is shared, per dataset: {"cpus", "actors", "actor_cpus", "io_cpus"}.

    Validation runs while the train pipeline is paused mid-epoch, its actors still
    holding their CPUs, so each pipeline gets its own slice (val the smaller: it runs
    rarely and while training waits). Both have one decode actor per CPU of
    ray.data_cpus (at least one); a slice of each budget is left to the read tasks.
    """
    actors = max(1, round(ray_params.data_cpus))
    val_cpus = ray_params.data_cpus * VAL_CPU_SHARE
    plan = {}
    for name, cpus in (("train", ray_params.data_cpus - val_cpus), ("val", val_cpus)):
        io_cpus = cpus * IO_CPU_SHARE
        plan[name] = {"cpus": cpus, "actors": actors, "actor_cpus": (cpus - io_cpus) / actors, "io_cpus": io_cpus}
    return plan


def execution_options(cpus: float) -> ExecutionOptions:
    """Ray Data's execution options for one dataset: CPU use capped at `cpus`, and rows
    in a fixed order, so the same seed gives the same epoch order."""
    return ExecutionOptions(resource_limits=ExecutionResources(cpu=cpus), preserve_order=True)


def _read_shards(files: list[str], io_cpus: float) -> ray.data.Dataset:
    # Ray Data's newer Parquet reader (use_datasource_v2) first lists the files in a
    # task that always asks for a whole CPU, which never starts while the training
    # workers hold most of the CPUs; the classic reader asks only for num_cpus.
    context = DataContext.get_current()
    newer_reader, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, num_cpus=io_cpus / PARALLEL_READS).select_columns(READ_COLUMNS)
    finally:
        context.use_datasource_v2 = newer_reader


def _decode(ds: ray.data.Dataset, res: dict, *fn_args, **fn_kwargs) -> ray.data.Dataset:
    ds = ds.map_batches(DecodeAugment, batch_size=DECODE_BATCH_ROWS, compute=ActorPoolStrategy(size=res["actors"]),
                        num_cpus=res["actor_cpus"], zero_copy_batch=True, fn_constructor_args=fn_args,
                        fn_constructor_kwargs=fn_kwargs)
    ds.context.execution_options = execution_options(res["cpus"])
    # Training prints its own progress (iteration, loss, it/s); Ray Data's bars,
    # redrawn by every worker's pipeline, would bury it in the stage log.
    ds.context.enable_progress_bars = False
    return ds


def train_rows(params: Params) -> int:
    """Rows of the train split, from the Parquet footers, without executing a dataset."""
    return count_rows(shard_files(params.data.shards_dir, "train"))


def batch_rows(params: Params) -> int:
    """Samples in one training batch: train.batch_size crops, or one whole image."""
    return params.train.batch_size if params.train.batch_mode == "crops" else 1


def train_epochs(params: Params, train_rows: int, steps: int) -> int:
    """Epochs of train plan for `steps` more steps of every worker: the fewest whose rows,
    split equally between the ray.num_workers workers, make that many batches each,
    plus a spare one (the equal split may drop a few rows)."""
    return math.ceil(steps * params.ray.num_workers * batch_rows(params) / max(train_rows, 1)) + 1


def resume_epoch(params: Params, train_rows: int, iteration: int) -> int:
    """The epoch step iteration + 1 falls in: where a run resumed after `iteration` starts its plan."""
    return iteration * params.ray.num_workers * batch_rows(params) // max(train_rows, 1)


def row_slices(files: list[str]) -> list[tuple[str, int, int, int]]:
    """(path, row group, first row, end row) of every slice of SLICE_ROWS rows, from the Parquet footers."""
    import pyarrow.parquet as pq
    slices = []
    for path in files:
        meta = pq.ParquetFile(path).metadata
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            slices += [(path, group, first, min(first + SLICE_ROWS, rows)) for first in range(0, rows, SLICE_ROWS)]
    return slices


def epoch_plan(params: Params, slices: list[tuple], epochs: range, start_iteration: int) -> list[dict]:
    """Every slice once per epoch, each epoch in its own order seeded from (train.seed, epoch)."""
    plan = []
    for epoch in epochs:
        order = np.random.default_rng(sample_seed(params.train.seed, epoch, "slice order")).permutation(len(slices))
        plan += [{"path": slices[i][0], "row_group": slices[i][1], "first": slices[i][2], "end": slices[i][3],
                  "epoch": epoch, "start_iteration": start_iteration} for i in order]
    return plan


def slice_reader(columns: list[str]):
    """The read tasks' map_batches function: plan entries -> their shard rows, each
    tagged with its epoch and start_iteration.

    A function made here, not a module-level one: Ray sends it by value, so the task
    processes import pyarrow only, not this module (torch, OpenCV: seconds per new
    process on 2 loaded cores, while the decode actors start too).
    """
    def read_slices(plan):
        import pyarrow as pa
        import pyarrow.parquet as pq
        tables = []
        for path, group, first, end, epoch, start in zip(plan["path"], plan["row_group"], plan["first"],
                                                         plan["end"], plan["epoch"], plan["start_iteration"]):
            rows = pq.ParquetFile(path).read_row_group(int(group), columns=columns).slice(first, end - first)
            tables.append(rows.append_column("epoch", pa.array([int(epoch)] * rows.num_rows, pa.int64()))
                          .append_column("start_iteration", pa.array([int(start)] * rows.num_rows, pa.int64())))
        return pa.concat_tables(tables)
    return read_slices


def build_train_dataset(params: Params, *, epochs: int = 1, start_iteration: int = 0) -> ray.data.Dataset:
    """The train dataset: `epochs` epochs from the one a run resumed after start_iteration is in.

    One execution yields them all, epoch after epoch (preserve_order), so its decode
    actors start once.
    """
    files = [str(f) for f in shard_files(params.data.shards_dir, "train")]
    slices = row_slices(files)
    rows = sum(end - first for _, _, first, end in slices)
    if rows == 0:
        raise DatasetError(f"{Path(files[0]).parent}: the train shards hold no rows (run `fcn preprocess` again)")
    res = data_resources(params.ray)["train"]
    first_epoch = resume_epoch(params, rows, start_iteration)
    plan = epoch_plan(params, slices, range(first_epoch, first_epoch + epochs), start_iteration)
    ds = ray.data.from_items(plan, override_num_blocks=len(plan))
    ds = ds.map_batches(slice_reader(READ_COLUMNS), batch_size=None, num_cpus=res["io_cpus"] / PARALLEL_READS,
                        compute=TaskPoolStrategy(size=READ_TASKS))
    return _decode(ds, res, params, True)


def build_datasets(params: Params, *, epochs: int = 1, start_iteration: int = 0) -> dict:
    """{"train": Dataset, "val": Dataset} over data.shards_dir, lazily defined.

    The train dataset holds `epochs` epochs, starting with the one a run resumed
    after start_iteration steps is in.
    """
    return {"train": build_train_dataset(params, epochs=epochs, start_iteration=start_iteration),
            "val": build_val_dataset(params)}


def build_val_dataset(params: Params) -> ray.data.Dataset:
    """The val dataset: every image once per execution, decoded, not augmented."""
    files = [str(f) for f in shard_files(params.data.shards_dir, "val")]
    res = data_resources(params.ray)["val"]
    return _decode(_read_shards(files, res["io_cpus"]), res, params, False)


def checkpoint_iteration(run_dir: str) -> int:
    """The iteration of a Ray Train run's latest registered checkpoint, the one its workers
    resume from (0 while it has none), from the "iteration" metric training reports with
    every checkpoint."""
    import ray.train
    try:
        result = ray.train.Result.from_path(run_dir)
    except RuntimeError:  # no run folder yet, or no checkpoint registered in it
        return 0
    return int(result.metrics["iteration"]) if result.metrics else 0


class TrainDatasetFactory:
    """The train dataset of a training run as Ray Train takes it: a callable, called when
    a worker group starts (the first time and after every failure), so the plan starts
    where the workers resume and covers the `iterations` - resumed steps they have left."""

    def __init__(self, params: Params, iterations: int, run_dir: str):
        self.params, self.iterations, self.run_dir = params, iterations, str(run_dir)

    def __call__(self) -> ray.data.Dataset:
        done = checkpoint_iteration(self.run_dir)
        rows = train_rows(self.params)
        epochs = train_epochs(self.params, rows, max(self.iterations - done, 0))
        log.info("train plan: %d epochs from epoch %d (resuming after iteration %d)", epochs,
                 resume_epoch(self.params, rows, done), done)
        return build_train_dataset(self.params, epochs=epochs, start_iteration=done)


def training_datasets(params: Params, iterations: int, run_dir: str) -> dict:
    """The TorchTrainer's `datasets` for a run of `iterations` steps stored in run_dir:
    {"train": TrainDatasetFactory, "val": Dataset}."""
    return {"train": TrainDatasetFactory(params, iterations, run_dir), "val": build_val_dataset(params)}


class ShardConfig(DataConfig):
    """Splits "train" equally between the training workers (every worker takes the
    same number of steps) and every other dataset without dropping rows (the val
    metrics need every image). Ray's DataConfig splits all of them equally."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        shards = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            splits = ds.streaming_split(world_size, equal=(name == "train"), locality_hints=worker_node_ids)
            for i, split in enumerate(splits):
                shards[i][name] = split
        return shards


def data_config(params: Params) -> ShardConfig:
    """The TorchTrainer's dataset_config: ShardConfig, each dataset under its CPU cap."""
    plan = data_resources(params.ray)
    return ShardConfig(execution_options={name: execution_options(res["cpus"]) for name, res in plan.items()})
