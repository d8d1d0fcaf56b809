"""Inside a training worker: its shards of the Ray Data pipeline (pipelines.data.dataset) -> torch batches.

`iter_train_batches(ray.train.get_dataset_shard("train"), params, start_iteration)` and
`iter_val_batches(ray.train.get_dataset_shard("val"), params)` yield (images float32
N x 3 x H x W, labels int64 N x H x W) on the worker's device; `ValBatches` keeps a small
val shard's batches after the first validation.

Pixels travel through Ray as uint8 RGB (a quarter of float32's bytes) and are
normalised for the model's weights (pipelines.core.params.input_norm: model.input_norm or
the backbone's own) on the device, by fcn_models.preprocess.normalize, so the mean
and std live in one place. Training samples pass a shuffle buffer of
SHUFFLE_BUFFER_ROWS, seeded from (train.seed, the iteration the worker resumed after).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from fcn_models.norms import InputNorm
from fcn_models.preprocess import normalize
from pipelines.core.params import Params, input_norm
from pipelines.data.dataset import batch_rows, sample_seed

log = logging.getLogger(__name__)

# Decoded training samples each worker mixes before batching (at least a batch):
# 64 crops of 512 x 512 are 50 MB.
SHUFFLE_BUFFER_ROWS = 64


def _stack(column: np.ndarray) -> np.ndarray:
    # A variable-shaped tensor column arrives as an object array of arrays; a fixed-shape
    # one as a read-only view of the object store, copied so torch may own it.
    return np.stack(list(column)) if column.dtype == object else np.array(column)


class ToTensors(NumpyBatchCollateFn):
    """uint8 numpy batch -> CPU tensors; Ray then moves them to the worker's device.

    With start_iteration given (training), warns once when the batches come from a
    plan made for a run resumed after another iteration: the driver planned from a
    different checkpoint than the worker resumed from (or the dataset was not built
    for this run), so epochs and augmentation do not follow the iteration count.
    """

    def __init__(self, start_iteration: Optional[int] = None):
        self.start_iteration = start_iteration
        self.warned = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.start_iteration is not None and not self.warned and "start_iteration" in batch:
            planned = int(batch["start_iteration"][0])
            if planned != self.start_iteration:
                self.warned = True
                log.warning("this worker resumed after iteration %d, but the train data was planned for a run "
                            "resumed after iteration %d (now at epoch %d): the epochs seen do not follow the "
                            "iteration count", self.start_iteration, planned, int(batch["epoch"][0]))
        return {"image": torch.from_numpy(_stack(batch["image"])),
                "label": torch.from_numpy(_stack(batch["label"]))}


def to_model_input(images, labels, params: Params, norm: Optional[InputNorm] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of uint8 RGB images (N x H x W x 3) and labels (N x H x W), arrays or tensors on
    any device, as the network takes them: normalised float32 N x 3 x H x W (for the stage's
    input normalisation, pipelines.core.params.input_norm) and int64 labels, on the same device."""
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    return normalize(images.permute(0, 3, 1, 2), norm or input_norm(params)), labels.long()


def _iter_batches(shard, params: Params, batch_size: int, drop_last: bool, start_iteration: Optional[int],
                  shuffle_seed: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    norm = input_norm(params)
    shuffle = {} if shuffle_seed is None else {
        "local_shuffle_buffer_size": max(SHUFFLE_BUFFER_ROWS, batch_size), "local_shuffle_seed": shuffle_seed}
    # device "auto": the Ray Train worker's device (its GPU when it has one), else the CPU.
    batches = shard.iter_torch_batches(batch_size=batch_size, collate_fn=ToTensors(start_iteration),
                                       device="auto", drop_last=drop_last, prefetch_batches=2,
                                       pin_memory=torch.cuda.is_available(), **shuffle)
    for batch in batches:
        yield to_model_input(batch["image"], batch["label"], params, norm)


def iter_train_batches(shard, params: Params, start_iteration: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches from a worker's shard, every epoch of the train plan in one pass:
    (N x 3 x H x W float32, N x H x W int64).

    start_iteration: the iteration this attempt resumed after (0 for a fresh run).
    Batch mode "whole": one whole image a batch; "crops": train.batch_size crops of
    augment.crop_size, the last incomplete batch dropped so every worker steps alike.
    Samples pass a shuffle buffer seeded from (train.seed, start_iteration).
    """
    crops = params.train.batch_mode == "crops"
    yield from _iter_batches(shard, params, batch_rows(params), drop_last=crops, start_iteration=start_iteration,
                             shuffle_seed=sample_seed(params.train.seed, start_iteration, "shuffle buffer") % 2**32)


def iter_val_batches(shard, params: Params) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches: each whole image at its own size, batch 1, not augmented."""
    yield from _iter_batches(shard, params, 1, drop_last=False, start_iteration=None)


# The bytes of val batches a worker keeps after its first validation (on the CPU); a
# worker's val shard larger than this streams through the val pipeline at every validation.
VAL_KEEP_BYTES = 512 * 2**20


class ValBatches:
    """A worker's validation batches, called once per validation: the first full pass streams
    them from its shard (iter_val_batches) and keeps a CPU copy when they fit in max_bytes;
    later passes replay that copy, the same batches in the same order (validation is not
    augmented), without starting the val pipeline again. A pass stopped early keeps nothing.

    all_agree(fits) -> bool: whether every worker's batches fit, called by each worker at the
    end of its first pass (the trainer's reduces over the process group). Either every worker
    keeps its batches or none does: the workers' val shards are splits of one execution, and
    a worker streaming alone would wait for the others to start it."""

    def __init__(self, shard, params: Params, max_bytes: int = VAL_KEEP_BYTES,
                 all_agree: Callable[[bool], bool] = lambda fits: fits):
        self.shard, self.params, self.max_bytes, self.all_agree = shard, params, max_bytes, all_agree
        self.kept: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    def __call__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.kept is not None:
            return iter(self.kept)
        return self._stream()

    def _stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        kept, size = [], 0
        for images, labels in iter_val_batches(self.shard, self.params):
            if kept is not None:
                size += images.nbytes + labels.nbytes
                if size <= self.max_bytes:
                    kept.append((images.cpu(), labels.cpu()))
                else:
                    kept = None
            yield images, labels
        self.kept = kept if self.all_agree(kept is not None) else None
