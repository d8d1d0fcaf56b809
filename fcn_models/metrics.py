"""Segmentation scores from one confusion matrix accumulated over a whole dataset.

Rows are the truth, columns the prediction. Scores are computed once from the
summed matrix (not averaged per image), as the paper reports them. Matrices from
several workers merge by addition, so a distributed evaluation sums its workers'
matrices and then scores.
"""
from __future__ import annotations

import numpy as np
import torch

from .voc import NUM_CLASSES, VOID

# The four scores of the paper's tables, in its column order, and their headings there.
SCORE_KEYS = ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")
SCORE_HEADINGS = dict(zip(SCORE_KEYS, ("pixel acc.", "mean acc.", "mean IU", "f.w. IU")))
# The score that ranks checkpoints, stages and registered versions.
MEAN_IU = "mean_iu"


class ConfusionMatrix:
    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = VOID, matrix=None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        if matrix is None:
            matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        matrix = np.asarray(matrix, dtype=np.int64)
        if matrix.shape != (num_classes, num_classes):
            raise ValueError(f"matrix has shape {matrix.shape}, expected {(num_classes, num_classes)}")
        self.matrix = matrix

    def update(self, prediction, target) -> "ConfusionMatrix":
        """Count pixels of a batch: prediction and target are label maps of equal shape.

        Target pixels equal to ignore_index are skipped. A target value outside
        0..num_classes-1 that is not the ignore label is an error, not a silent drop.
        """
        pred = torch.as_tensor(prediction).reshape(-1).to("cpu", torch.int64)
        true = torch.as_tensor(target).reshape(-1).to("cpu", torch.int64)
        if pred.shape != true.shape:
            raise ValueError(f"prediction has {pred.numel()} pixels, target {true.numel()}")
        keep = true != self.ignore_index
        pred, true = pred[keep], true[keep]
        n = self.num_classes
        if true.numel() and (true.min() < 0 or true.max() >= n):
            bad = true[(true < 0) | (true >= n)][0].item()
            raise ValueError(f"target holds label {bad}, outside 0..{n - 1} and not the ignore label {self.ignore_index}")
        if pred.numel() and (pred.min() < 0 or pred.max() >= n):
            bad = pred[(pred < 0) | (pred >= n)][0].item()
            raise ValueError(f"prediction holds label {bad}, outside 0..{n - 1}")
        counts = torch.bincount(true * n + pred, minlength=n * n)
        self.matrix += counts.reshape(n, n).numpy()
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class matrix into {self.num_classes}-class one")
        self.matrix += other.matrix
        return self

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return ConfusionMatrix(self.num_classes, self.ignore_index, self.matrix.copy()).merge(other)

    def reset(self) -> None:
        self.matrix[:] = 0

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    def scores(self) -> dict:
        return scores_from_matrix(self.matrix)


def scores_from_matrix(matrix) -> dict:
    """Pixel accuracy, mean accuracy, mean IU, frequency-weighted IU and per-class IU.

    A class absent from both truth and prediction has an undefined IU (NaN) and is
    left out of the means, so it neither helps nor hurts; per_class_iu keeps the NaN
    so the caller can tell "absent" from "zero".
    """
    m = np.asarray(matrix, dtype=np.float64)
    total = m.sum()
    diag = np.diag(m)
    truth = m.sum(axis=1)
    predicted = m.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        class_acc = np.where(truth > 0, diag / truth, np.nan)
        union = truth + predicted - diag
        iu = np.where(union > 0, diag / union, np.nan)
    freq = truth / total if total > 0 else np.zeros_like(truth)
    present = freq > 0
    return {
        "pixel_acc": float(diag.sum() / total) if total > 0 else float("nan"),
        "mean_acc": _nanmean(class_acc),
        "mean_iu": _nanmean(iu),
        "fw_iu": float((freq[present] * iu[present]).sum()) if total > 0 else float("nan"),
        "per_class_iu": [float(v) for v in iu],
    }


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def stride_ceiling(label: torch.Tensor, stride: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """The best label map an output of this stride can give back: `label` (H x W class ids,
    VOID ignored) reduced to one class-share vector per stride x stride cell, brought back to
    H x W bilinearly as an FCN's upsampling does, and its most likely class per pixel.

    Scored against `label`, it bounds what a network whose scores live on that grid can
    reach (the labels' own coarse version, not a learned one): the ceiling of FCN-32s,
    -16s and -8s on a val set."""
    return stride_ceiling_maps(label, (stride,), num_classes)[stride]


def stride_ceiling_maps(label: torch.Tensor, strides, num_classes: int = NUM_CLASSES) -> dict[int, torch.Tensor]:
    """{stride: stride_ceiling(label, stride)} for several strides, the class shares made once."""
    label = torch.as_tensor(label).long()
    valid = label != VOID
    onehot = torch.zeros(1, num_classes, *label.shape)
    onehot[0].scatter_(0, label.clamp(0, num_classes - 1)[None], valid[None].float())
    maps = {}
    for stride in strides:
        shares = torch.nn.functional.avg_pool2d(onehot, stride, stride, ceil_mode=True)
        back = torch.nn.functional.interpolate(shares, size=label.shape, mode="bilinear", align_corners=False)
        # The argmax over classes on a pixel-major copy: one pass over contiguous memory.
        maps[stride] = back[0].permute(1, 2, 0).contiguous().argmax(-1)
    return maps
