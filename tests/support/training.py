"""Test helpers shared across parts: training."""
import csv

import numpy as np

from pipelines.core.params import parse_params
from support.shard_rows import sample_row, write_split

WIDTH = 0.0625


N_TRAIN, N_VAL = 8, 5


# Shapes of the generated images: one smaller, so val images of two sizes meet in a run.
SIZES = ((24, 32), (20, 28))


def write_shards(shards_dir, n_train=N_TRAIN, n_val=N_VAL, seed=0):
    """Train and val shards of coloured rectangles (class 1 red, class 2 blue) on grey,
    a void row on top of each label."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        rows = []
        for i in range(count):
            height, width = SIZES[i % len(SIZES)]
            label = np.zeros((height, width), np.uint8)
            y, x = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
            label[y:y + height // 2, x:x + width // 2] = 1 + i % 2
            label[0, :] = 255
            image = np.full((height, width, 3), 90, np.uint8)
            image[label == 1] = (220, 40, 40)
            image[label == 2] = (40, 40, 220)
            rows.append(sample_row(f"{split}_{i:06d}", image, label))
        write_split(shards_dir / split, rows)


def make_params(root, stages, *, workers=2, max_failures=0, **train_knobs):
    """Params for runs under root: tiny network, no ImageNet weights, mean loss."""
    return parse_params({
        "data": {"shards_dir": str(root / "shards")},
        "model": {"width": WIDTH, "imagenet_weights": None},
        "augment": {"hflip": 0.5},
        "train": {"loss": "mean", "val_every": 2, "log_every": 2, "checkpoints_to_keep": 2,
                  "models_dir": str(root / "models"), "reports_dir": str(root / "reports"),
                  "stages": stages, **train_knobs},
        "ray": {"num_workers": workers, "cpus_per_worker": 0.5, "data_cpus": 0.5, "max_failures": max_failures,
                "storage_path": str(root / "ray_results")},
    }, "test params", root=root)


def read_history(path):
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
