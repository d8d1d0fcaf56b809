"""Ray Data input pipeline: Parquet shards -> decoded, augmented torch batches.

    train: read_parquet -> randomize_block_order -> map_batches(DecodeAugment) -> local shuffle
    val:   read_parquet -> map_batches(DecodeAugment, augmentation off)

`build_datasets(params)` builds both on the driver; `data_config(params)` is the
`dataset_config` to give the TorchTrainer; inside each training worker,
`iter_train_batches(ray.train.get_dataset_shard("train"), params, epoch)` and
`iter_val_batches(ray.train.get_dataset_shard("val"), params)` yield
(images float32 N x 3 x H x W, labels int64 N x H x W) on the worker's device.

Pixels travel through Ray as uint8 RGB (a quarter of float32's bytes) and are
normalised for the model's weights (model.input_norm) on the device, by
fcn_models.preprocess.normalize, so the mean and std live in one place.

Randomness: each sample's augmentation is drawn from (train.seed, epoch, sample id),
so it does not depend on which process handles the sample, yet every worker and
epoch sees different crops and flips. An epoch is one execution of the train
dataset: each pass a training worker makes over its shard re-executes the
pipeline, and Ray Data counts executions. Its seeded block shuffle uses the same
count, so order and augmentation advance together.

Order: blocks of a few dozen rows in a seeded random order, new each epoch, then a
seeded shuffle buffer of SHUFFLE_BUFFER_ROWS decoded samples in each worker. The block
order waits for the split to be read at each epoch's start; a full random_shuffle
would also exchange every row between tasks: on 2 cores, 4.5-5.5 s before the first
batch for 1,600 VOC-size images, against 1-1.5 s to read them.

CPUs: the training workers reserve ray.num_workers x ray.cpus_per_worker; Ray Data
gets ray.data_cpus, shared between the train and val pipelines (validation runs
while a train epoch is paused) and within each between the decode actors and the
Parquet read tasks, and is capped there through its execution options. Nothing in
the pipeline asks for a CPU a training worker holds, so it cannot wait forever.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy, DataContext, ExecutionOptions, ExecutionResources, RandomSeedConfig
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import DataConfig

from fcn_models.preprocess import as_input_norm, normalize
from pipelines.params import PROJECT_ROOT, Params, RayParams, resolve
from pipelines.shards import ShardError, decode_sample

# albumentations asks PyPI for a newer version when first imported (in build_augmentation,
# so in every decode actor); the pipeline must not touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Columns the pipeline reads; source, height and width stay on disk.
READ_COLUMNS = ["id", "image", "label"]
VOID = 255
# Rows per DecodeAugment call: small enough that a batch of 512 x 512 crops is a few
# MB of object store, large enough that Ray's per-call overhead is noise.
DECODE_BATCH_ROWS = 16
# Share of ray.data_cpus for the val pipeline, and of each pipeline's CPUs for reading
# Parquet: read tasks move bytes and barely compute, but each needs some CPU to be
# scheduled at all. The rest goes to the decode actors.
VAL_CPU_SHARE = 0.2
IO_CPU_SHARE = 0.2
# Parquet files read at once within a pipeline's read slice: the block shuffle waits
# for the whole split to be read, and reading is I/O and copying more than compute.
PARALLEL_READS = 4
# Decoded training samples each worker mixes before batching (at least a batch):
# 64 crops of 512 x 512 are 50 MB.
SHUFFLE_BUFFER_ROWS = 64


class DatasetError(ShardError):
    """Shards that cannot feed training; the message names the path and the fix."""


# --------------------------------------------------------------------------- decode + augment

def mean_colour(input_norm: str) -> tuple[int, int, int]:
    """The normalisation's mean as an RGB 0-255 pixel: padding with it feeds the net zeros."""
    norm = as_input_norm(input_norm)
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
                                   border_mode=cv2.BORDER_CONSTANT, fill=mean_colour(params.model.input_norm),
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


def _execution_count() -> int:
    # Ray Data counts executions of a dataset in its DataContext, and hands that
    # context to every task and actor of the execution; its seeded shuffle and
    # random() expression key on the same count.
    return int(DataContext.get_current()._execution_idx)


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
    """map_batches callable: shard rows -> {"id", "epoch", "image" uint8 RGB, "label" uint8}.

    Ray Data builds one per actor, so the albumentations pipeline is built once per
    process. With augment=False (validation) it only decodes, keeping each image's size.
    `epoch` fixes the epoch for direct use; left None, it is start_epoch plus the
    number of earlier executions of the dataset.
    """

    def __init__(self, params: Params, augment: bool, epoch: Optional[int] = None, start_epoch: int = 0):
        self.seed = params.train.seed
        self.epoch = epoch
        self.start_epoch = start_epoch
        self.transform = build_augmentation(params) if augment else None
        # Each actor owns a slice of a CPU; OpenCV's own thread pool would oversubscribe it.
        cv2.setNumThreads(1)

    def current_epoch(self) -> int:
        return self.epoch if self.epoch is not None else self.start_epoch + _execution_count()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch = self.current_epoch()
        images, labels = [], []
        for sample_id, image_bytes, label_bytes in zip(batch["id"], batch["image"], batch["label"]):
            image, label = decode_sample(str(sample_id), image_bytes, label_bytes)
            if self.transform is not None:
                self.transform.set_random_seed(sample_seed(self.seed, epoch, str(sample_id)))
                out = self.transform(image=image, mask=label)
                image, label = out["image"], out["mask"]
            images.append(np.ascontiguousarray(image))
            labels.append(np.ascontiguousarray(label))
        return {
            "id": np.asarray(batch["id"]),
            "epoch": np.full(len(images), epoch, dtype=np.int64),
            "image": _column(images),
            "label": _column(labels),
        }


# --------------------------------------------------------------------------- datasets (driver)

def shard_files(shards_dir: Path, split: str) -> list[Path]:
    """The Parquet shards of one split, checked to exist."""
    split_dir = Path(shards_dir) / split
    files = sorted(split_dir.glob("part-*.parquet"))
    if not files:
        raise DatasetError(f"{split_dir}: no part-*.parquet shards (run `fcn preprocess`, or check data.shards_dir)")
    return files


def shard_rows(params: Params, root: Path = PROJECT_ROOT) -> dict[str, int]:
    """Rows per split from the Parquet footers, without executing a dataset."""
    import pyarrow.parquet as pq
    shards_dir = resolve(params.data.shards_dir, root)
    return {split: sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(shards_dir, split))
            for split in SPLITS}


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


def check_cpu_budget(params: Params, cluster_cpus: float) -> None:
    """Fail fast when training workers plus Ray Data need more CPUs than the cluster has:
    otherwise the decode actors wait for a free CPU forever and training hangs."""
    r = params.ray
    need = r.num_workers * r.cpus_per_worker + r.data_cpus
    if need > cluster_cpus + 1e-9:
        raise DatasetError(
            f"ray.num_workers ({r.num_workers}) x ray.cpus_per_worker ({r.cpus_per_worker}) + ray.data_cpus "
            f"({r.data_cpus}) = {need:g} CPUs, but the Ray cluster has {cluster_cpus:g}: lower "
            "ray.cpus_per_worker or ray.data_cpus (fractions are fine, e.g. 0.75 and 0.5 on 2 cores)")


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


def _connect(params: Params) -> None:
    # Join or start Ray as training does (ray.address; a local cluster on 127.0.0.1).
    if not ray.is_initialized():
        from pipelines.train import connect_ray
        connect_ray(params.ray)


def build_datasets(params: Params, root: Path = PROJECT_ROOT, *, start_epoch: int = 0) -> dict:
    """{"train": Dataset, "val": Dataset} over data.shards_dir, lazily defined.

    Joins or starts Ray as training does. start_epoch numbers the first
    pass over the train dataset, for a run resumed from a checkpoint.
    """
    shards_dir = resolve(params.data.shards_dir, root)
    files = {split: [str(f) for f in shard_files(shards_dir, split)] for split in SPLITS}
    _connect(params)
    plan = data_resources(params.ray)

    def decode(ds, split, **kwargs):
        res = plan[split]
        ds = ds.map_batches(DecodeAugment, batch_size=DECODE_BATCH_ROWS, compute=ActorPoolStrategy(size=res["actors"]),
                            num_cpus=res["actor_cpus"], zero_copy_batch=True, **kwargs)
        ds.context.execution_options = execution_options(res["cpus"])
        # Training prints its own progress (iteration, loss, it/s); Ray Data's bars,
        # redrawn by every worker's pipeline, would bury it in the stage log.
        ds.context.enable_progress_bars = False
        return ds

    train = _read_shards(files["train"], plan["train"]["io_cpus"])
    # Seeded from (seed, start_epoch), so a resumed run does not replay epoch 0's order;
    # Ray reseeds it on every execution (epoch) of the dataset.
    order_seed = sample_seed(params.train.seed, start_epoch, "block order") % 2**31
    train = train.randomize_block_order(seed=RandomSeedConfig(seed=order_seed, reseed_after_execution=True))
    train = decode(train, "train", fn_constructor_args=(params, True),
                   fn_constructor_kwargs={"start_epoch": start_epoch})
    val = decode(_read_shards(files["val"], plan["val"]["io_cpus"]), "val", fn_constructor_args=(params, False))
    return {"train": train, "val": val}


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
    """The TorchTrainer's dataset_config: ShardConfig, each dataset under its CPU cap.

    Checks first that the training workers and Ray Data fit in the cluster's CPUs.
    """
    _connect(params)
    check_cpu_budget(params, ray.cluster_resources().get("CPU", 0.0))
    plan = data_resources(params.ray)
    return ShardConfig(execution_options={name: execution_options(res["cpus"]) for name, res in plan.items()})


# --------------------------------------------------------------------------- batches (training worker)

def _stack(column: np.ndarray) -> np.ndarray:
    # A variable-shaped tensor column arrives as an object array of arrays; a fixed-shape
    # one as a read-only view of the object store, copied so torch may own it.
    return np.stack(list(column)) if column.dtype == object else np.array(column)


class ToTensors(NumpyBatchCollateFn):
    """uint8 numpy batch -> CPU tensors; Ray then moves them to the worker's device.

    Warns once when the batches' epoch is not the one training expects.
    """

    def __init__(self, expected_epoch: Optional[int] = None):
        self.expected_epoch = expected_epoch
        self.warned = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        epoch = int(batch["epoch"][0])
        if self.expected_epoch is not None and epoch != self.expected_epoch and not self.warned:
            self.warned = True
            log.warning("the data pipeline is on epoch %d while training is on epoch %d (a restarted worker "
                        "group, or the train dataset executed outside training): augmentation follows the "
                        "pipeline's count", epoch, self.expected_epoch)
        return {"image": torch.from_numpy(_stack(batch["image"])),
                "label": torch.from_numpy(_stack(batch["label"]))}


def _iter_batches(shard, params: Params, batch_size: int, drop_last: bool, expected_epoch: Optional[int],
                  shuffle_seed: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    shuffle = {} if shuffle_seed is None else {
        "local_shuffle_buffer_size": max(SHUFFLE_BUFFER_ROWS, batch_size), "local_shuffle_seed": shuffle_seed}
    # device "auto": the Ray Train worker's device (its GPU when it has one), else the CPU.
    batches = shard.iter_torch_batches(batch_size=batch_size, collate_fn=ToTensors(expected_epoch),
                                       device="auto", drop_last=drop_last, prefetch_batches=2,
                                       pin_memory=torch.cuda.is_available(), **shuffle)
    for batch in batches:
        images = normalize(batch["image"].permute(0, 3, 1, 2), params.model.input_norm)
        yield images, batch["label"].long()


def iter_train_batches(shard, params: Params, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of training batches from a worker's shard: (N x 3 x H x W float32, N x H x W int64).

    Batch mode "whole": one whole image a batch; "crops": train.batch_size crops of
    augment.crop_size, the last incomplete batch dropped so every worker steps alike.
    Samples pass a shuffle buffer seeded from (train.seed, epoch).
    """
    crops = params.train.batch_mode == "crops"
    yield from _iter_batches(shard, params, params.train.batch_size if crops else 1, drop_last=crops,
                             expected_epoch=epoch,
                             shuffle_seed=sample_seed(params.train.seed, epoch, "shuffle buffer") % 2**32)


def iter_val_batches(shard, params: Params) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches: each whole image at its own size, batch 1, not augmented."""
    yield from _iter_batches(shard, params, 1, drop_last=False, expected_epoch=None)
