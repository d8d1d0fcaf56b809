"""The Ray Data input pipeline: decoding, augmentation, seeding, batching, CPU sizing.

The shards are written here by a small fixture (JPEG/PNG pairs made with numpy and
Pillow, stored with pyarrow as the shard contract says). Ray starts once for the module.
"""
import io
import json
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from ray import cloudpickle
from support.shard_rows import sample_row, write_split

from fcn_models.preprocess import CAFFE_BGR, TORCHVISION_RGB, normalize
from pipelines.core.params import parse_params
from pipelines.data.batches import ToTensors, ValBatches, iter_train_batches, iter_val_batches
from pipelines.data.dataset import (
    DecodeAugment,
    TrainDatasetFactory,
    build_datasets,
    checkpoint_iteration,
    data_config,
    data_resources,
    resume_epoch,
    sample_seed,
    train_epochs,
    train_rows,
)
from pipelines.data.shards import ShardError, count_rows, decode_sample, shard_files
from pipelines.train.cluster import ClusterError, bind_loopback, check_cpu_budget

N_TRAIN, N_VAL = 24, 10
CROP = 64
CLASSES = (0, 3, 7, 15)


def make_params(shards_dir, **sections):
    mapping = {
        "data": {"shards_dir": str(shards_dir)},
        "model": {"input_norm": "torchvision-rgb"},
        "augment": {"scale_min": 0.75, "scale_max": 1.5, "crop_size": CROP, "hflip": 0.5},
        "train": {"seed": 7, "batch_mode": "crops", "batch_size": 4},
        "ray": {"num_workers": 2, "cpus_per_worker": 0.75, "data_cpus": 0.5},
    }
    for name, values in sections.items():
        mapping[name] = {**mapping[name], **values}
    return parse_params(mapping, "test params")


def make_sample(rng, height, width):
    """A smooth random image and a label of class rectangles with a void outline."""
    label = np.zeros((height, width), np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, height - 8), rng.integers(0, width - 8)
        y1, x1 = y0 + rng.integers(6, height - y0 + 1), x0 + rng.integers(6, width - x0 + 1)
        label[y0:y1, x0:x1] = rng.choice(CLASSES[1:])
        label[y0, x0:x1] = 255
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    return image, label


def write_shard_split(split_dir, ids, rng, rows_per_file=7):
    rows = []
    for i, sample_id in enumerate(ids):
        # Every third image is smaller than the crop on one side, so crops need padding.
        height, width = (40, 90) if i % 3 == 0 else (int(rng.integers(70, 110)), int(rng.integers(70, 110)))
        image, label = make_sample(rng, height, width)
        rows.append(sample_row(sample_id, image, label))
    write_split(split_dir, rows, rows_per_file)
    return rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    rows = {"train": write_shard_split(root / "train", [f"2008_{i:06d}" for i in range(N_TRAIN)], rng),
            "val": write_shard_split(root / "val", [f"2007_{i:06d}" for i in range(N_VAL)], rng)}
    return root, rows


@pytest.fixture(scope="module")
def ray_local():
    import ray
    from ray.data import DataContext

    bind_loopback()  # the local cluster listens on 127.0.0.1 only
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def as_batch(rows):
    return {"id": np.array([r["id"] for r in rows], dtype=object),
            "image": np.array([r["image"] for r in rows], dtype=object),
            "label": np.array([r["label"] for r in rows], dtype=object)}


# --------------------------------------------------------------------------- decode and augment

def test_decode_keeps_label_exact_and_image_size(shards):
    root, rows = shards
    row = rows["val"][1]
    image, label = decode_sample(row["id"], row["image"], row["label"])
    assert image.shape == (row["height"], row["width"], 3) and image.dtype == np.uint8
    assert np.array_equal(label, np.array(Image.open(io.BytesIO(row["label"]))))
    reference = np.array(Image.open(io.BytesIO(row["image"])).convert("RGB"), dtype=np.int16)
    # Same JPEG through another decoder: equal up to rounding, and RGB (not BGR) order.
    assert np.abs(image.astype(np.int16) - reference).mean() < 2.0


def test_validation_is_decoded_only(shards):
    root, rows = shards
    params = make_params(root)
    out = DecodeAugment(params, augment=False)(as_batch(rows["val"][:3]))
    for i, row in enumerate(rows["val"][:3]):
        assert out["image"][i].shape == (row["height"], row["width"], 3)
        assert np.array_equal(out["label"][i], np.array(Image.open(io.BytesIO(row["label"]))))


@pytest.mark.parametrize("norm, mean_rgb", [(TORCHVISION_RGB, (124, 116, 104)), (CAFFE_BGR, (123, 117, 104))])
def test_padding_fills_label_with_void_and_image_with_mean(shards, norm, mean_rgb):
    root, rows = shards
    params = make_params(root, model={"input_norm": norm.name},
                         augment={"scale_min": 1.0, "scale_max": 1.0, "crop_size": 96, "hflip": 0.0})
    row = rows["train"][0]  # 40 x 90: padded to 96 x 96 below and to the right
    source_image, source_label = decode_sample(row["id"], row["image"], row["label"])
    out = DecodeAugment(params, augment=True, epoch=0)(as_batch([row]))
    image, label = out["image"][0], out["label"][0]
    assert image.shape == (96, 96, 3) and label.shape == (96, 96)
    assert np.array_equal(label[:40, :90], source_label)
    assert np.array_equal(image[:40, :90], source_image)
    assert (label[40:] == 255).all() and (label[:, 90:] == 255).all()
    assert (image[40:] == mean_rgb).all() and (image[:, 90:] == mean_rgb).all()
    # The mean colour is what the network sees as (almost) zero.
    x = normalize(image, norm)
    assert x[:, 40:].abs().max() < 0.5 * norm.scale / min(norm.std)


def test_rescale_resizes_labels_nearest_and_by_the_factor(shards):
    root, rows = shards
    row = rows["train"][1]
    source_image, source_label = decode_sample(row["id"], row["image"], row["label"])
    half = make_params(root, augment={"scale_min": 0.5, "scale_max": 0.5, "hflip": 0.0}, train={"batch_mode": "whole",
                                                                                                "batch_size": 1})
    out = DecodeAugment(half, augment=True, epoch=0)(as_batch([row]))
    height, width = out["image"][0].shape[:2]
    assert abs(height - row["height"] / 2) <= 1 and abs(width - row["width"] / 2) <= 1
    assert np.array_equal(out["label"][0], cv2.resize(source_label, out["label"][0].shape[::-1],
                                                      interpolation=cv2.INTER_NEAREST))
    # Any factor, any crop: only the source's class values, never a blend of two of them.
    wide = make_params(root, augment={"scale_min": 0.4, "scale_max": 2.5})
    present = set(np.unique(source_label).tolist())
    for epoch in range(6):
        label = DecodeAugment(wide, augment=True, epoch=epoch)(as_batch([row]))["label"][0]
        assert set(np.unique(label).tolist()) <= present | {255}


def test_augmentation_reproducible_from_seed_epoch_and_id(shards):
    root, rows = shards
    params = make_params(root)
    batch = as_batch(rows["train"][:8])
    first = DecodeAugment(params, augment=True, epoch=2)(batch)
    again = DecodeAugment(make_params(root), augment=True, epoch=2)(batch)
    assert np.array_equal(first["image"], again["image"]) and np.array_equal(first["label"], again["label"])
    # A sample's augmentation does not depend on its batch-mates or position.
    alone = DecodeAugment(params, augment=True, epoch=2)(as_batch(rows["train"][5:6]))
    assert np.array_equal(alone["image"][0], first["image"][5])
    other_epoch = DecodeAugment(params, augment=True, epoch=3)(batch)
    other_seed = DecodeAugment(make_params(root, train={"seed": 8}), augment=True, epoch=2)(batch)
    assert not np.array_equal(first["image"], other_epoch["image"])
    assert not np.array_equal(first["image"], other_seed["image"])


def test_samples_in_one_batch_get_their_own_crops_and_flips(shards):
    root, rows = shards
    params = make_params(root, augment={"scale_min": 1.0, "scale_max": 1.0})
    # The same pixels under 12 ids: a shared random state would crop and flip them alike.
    twins = [{**rows["train"][1], "id": f"twin_{i}"} for i in range(12)]
    out = DecodeAugment(params, augment=True, epoch=0)(as_batch(twins))
    distinct = {out["image"][i].tobytes() for i in range(12)}
    assert len(distinct) >= 10
    assert len({sample_seed(7, 0, t["id"]) for t in twins}) == 12
    assert sample_seed(7, 0, "a") == sample_seed(7, 0, "a") != sample_seed(7, 1, "a")


def test_bad_shards_fail_with_the_path_or_id(tmp_path, shards):
    root, rows = shards
    with pytest.raises(ShardError, match=r"val: no part-\*\.parquet shards; .*fcn preprocess"):
        shard_files(tmp_path, "val")
    with pytest.raises(ShardError, match="sample 2008_x: image bytes are not a decodable JPEG"):
        decode_sample("2008_x", b"not a jpeg", rows["train"][0]["label"])
    with pytest.raises(ShardError, match="sample 2008_y: label is not a single-channel"):
        decode_sample("2008_y", rows["train"][0]["image"], rows["train"][0]["image"])
    assert train_rows(make_params(root)) == N_TRAIN
    assert count_rows(shard_files(root, "val")) == N_VAL


def test_collate_makes_tensors_and_warns_once_when_the_plan_is_for_another_resume(caplog):
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((1, 2, 3), np.uint8), np.zeros((1, 2, 3), np.uint8)
    batch = {"epoch": np.array([2, 2]), "start_iteration": np.array([0, 0]), "image": ragged,
             "label": np.arange(4, dtype=np.uint8).reshape(2, 1, 2)}
    collate = ToTensors(start_iteration=30)
    with caplog.at_level("WARNING", logger="pipelines.data.dataset"):
        out = collate(batch)
        collate(batch)
    assert out["image"].shape == (2, 1, 2, 3) and out["label"].tolist() == [[[0, 1]], [[2, 3]]]
    assert [r.getMessage() for r in caplog.records].count(
        "this worker resumed after iteration 30, but the train data was planned for a run resumed after "
        "iteration 0 (now at epoch 2): the epochs seen do not follow the iteration count") == 1
    caplog.clear()
    ToTensors(start_iteration=0)(batch)
    ToTensors()(batch)  # validation: no plan to check
    assert not caplog.records


def test_epochs_planned_for_the_steps_left_and_resumed_in_the_current_epoch():
    params = make_params("unused")  # 2 workers x batches of 4: 8 rows a step
    assert train_epochs(params, 24, 0) == 1
    # 3 steps use 24 rows: one epoch, plus the spare one.
    assert [train_epochs(params, 24, steps) for steps in (1, 3, 4, 6, 7)] == [2, 2, 3, 3, 4]
    assert [resume_epoch(params, 24, iteration) for iteration in (0, 2, 3, 5, 6)] == [0, 0, 1, 1, 2]
    whole = make_params("unused", train={"batch_mode": "whole", "batch_size": 1}, ray={"num_workers": 1})
    assert train_epochs(whole, 24, 24) == 2 and resume_epoch(whole, 24, 47) == 1


def test_cpu_budget_names_the_params():
    params = make_params("unused", ray={"num_workers": 2, "cpus_per_worker": 1.0, "data_cpus": 1.0})
    with pytest.raises(ClusterError, match=r"ray.cpus_per_worker \(1.0\).*= 3 CPUs, but the Ray cluster has 2"):
        check_cpu_budget(params.ray, 2.0)
    check_cpu_budget(make_params("unused").ray, 2.0)  # 2 x 0.75 + 0.5 fits
    for data_cpus, actors in ((0.5, 1), (2.0, 2), (3.0, 3)):
        plan = data_resources(make_params("unused", ray={"data_cpus": data_cpus}).ray)
        # Every decode actor and task of both pipelines at once stays within ray.data_cpus.
        total = sum(p["actors"] * p["actor_cpus"] + p["io_cpus"] for p in plan.values())
        assert abs(total - data_cpus) < 1e-9
        assert all(p["actors"] == actors and p["actor_cpus"] > 0 and p["io_cpus"] > 0 for p in plan.values())


# --------------------------------------------------------------------------- through Ray

def test_one_execution_holds_the_epochs_each_shuffled_and_augmented_for_its_epoch(shards, ray_local):
    root, rows = shards
    params = make_params(root)
    train = build_datasets(params, epochs=3)["train"]
    by_id = {r["id"]: r for r in rows["train"]}
    batches = list(train.iter_batches(batch_size=None, batch_format="numpy"))
    epochs = np.concatenate([b["epoch"] for b in batches])
    ids = [i for b in batches for i in b["id"]]
    # Epoch after epoch, each every sample once.
    assert epochs.tolist() == [0] * N_TRAIN + [1] * N_TRAIN + [2] * N_TRAIN
    orders = [ids[e * N_TRAIN:(e + 1) * N_TRAIN] for e in range(3)]
    assert all(sorted(order) == sorted(by_id) for order in orders)
    assert len({tuple(order) for order in orders}) == 3
    assert all((b["start_iteration"] == 0).all() for b in batches)
    # The actors' output for an id equals the same augmentation done here, for its epoch.
    images = [image for b in batches for image in b["image"]]
    for epoch in range(3):
        row = epoch * N_TRAIN + 5
        local = DecodeAugment(params, augment=True, epoch=epoch)(as_batch([by_id[ids[row]]]))
        assert np.array_equal(images[row], local["image"][0])
    # A second build with the same seed replays the same orders; one resumed after
    # iteration 3 (24 rows of 2 workers x 4: epoch 1) starts with epoch 1's order.
    rebuilt = build_datasets(make_params(root), epochs=1)["train"]
    assert [i for b in rebuilt.iter_batches(batch_size=None) for i in b["id"]] == orders[0]
    resumed = list(build_datasets(params, epochs=2, start_iteration=3)["train"].iter_batches(batch_size=None))
    assert [i for b in resumed for i in b["id"]] == orders[1] + orders[2]
    assert np.concatenate([b["start_iteration"] for b in resumed]).tolist() == [3] * 2 * N_TRAIN


def test_crop_and_whole_image_batches(shards, ray_local):
    root, rows = shards
    params = make_params(root)
    datasets = build_datasets(params)
    batches = list(iter_train_batches(datasets["train"].iterator(), params))
    assert len(batches) == N_TRAIN // 4
    for images, labels in batches:
        assert images.dtype == torch.float32 and images.shape == (4, 3, CROP, CROP)
        assert labels.dtype == torch.int64 and labels.shape == (4, CROP, CROP)
        assert set(labels.unique().tolist()) <= set(CLASSES) | {255}
    # Normalised for torchvision weights: pixel 0 -> -0.485/0.229, pixel 255 -> (1-0.485)/0.229 (red).
    reds = torch.cat([images[:, 0].flatten() for images, _ in batches])
    assert reds.min() >= -0.485 / 0.229 - 1e-5 and reds.max() <= (1 - 0.485) / 0.229 + 1e-5

    sizes = sorted((labels.shape[1], labels.shape[2]) for _, labels in iter_val_batches(datasets["val"].iterator(),
                                                                                          params))
    assert sizes == sorted((r["height"], r["width"]) for r in rows["val"])

    whole = make_params(root, train={"batch_mode": "whole", "batch_size": 1},
                        augment={"scale_min": 1.0, "scale_max": 1.0, "hflip": 1.0})
    shapes = [(images.shape, labels.shape) for images, labels in
              iter_train_batches(build_datasets(whole)["train"].iterator(), whole)]
    assert sorted((s[1][1], s[1][2]) for s in shapes) == sorted((r["height"], r["width"]) for r in rows["train"])
    assert all(i[0] == 1 and i[1] == 3 and i[2:] == l[1:] for i, l in shapes)


class CountedShard:
    """A real DataIterator that counts the passes started over it."""

    def __init__(self, shard):
        self.shard, self.passes = shard, 0

    def iter_torch_batches(self, **kwargs):
        self.passes += 1
        return self.shard.iter_torch_batches(**kwargs)


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def test_val_batches_are_kept_after_the_first_pass_when_they_fit(shards, ray_local):
    root, rows = shards
    params = make_params(root)
    shard = CountedShard(build_datasets(params)["val"].iterator())
    val = ValBatches(shard, params)
    first = list(val())
    assert len(first) == N_VAL and shard.passes == 1
    again, third = list(val()), list(val())
    assert shard.passes == 1                                  # replayed, the pipeline not started again
    assert same_batches(first, again) and same_batches(first, third)
    streamed = list(iter_val_batches(build_datasets(params)["val"].iterator(), params))
    assert same_batches(first, streamed)


@pytest.mark.parametrize("case", ["too large", "a worker disagrees"])
def test_val_batches_stream_every_time_when_not_every_worker_can_keep_them(shards, ray_local, case):
    root, rows = shards
    params = make_params(root)
    shard = CountedShard(build_datasets(params)["val"].iterator())
    smallest = min(3 * 4 * r["height"] * r["width"] for r in rows["val"])  # one float32 image
    asked = []
    val = ValBatches(shard, params, max_bytes=smallest if case == "too large" else 2**30,
                     all_agree=lambda fits: asked.append(fits) or case != "a worker disagrees")
    first = list(val())
    assert asked == [case != "too large"] and val.kept is None
    assert same_batches(first, list(val())) and shard.passes == 2


def test_a_val_pass_stopped_early_keeps_nothing(shards, ray_local):
    root, rows = shards
    params = make_params(root)
    shard = CountedShard(build_datasets(params)["val"].iterator())
    val = ValBatches(shard, params)
    partial = val()
    next(partial)
    partial.close()
    assert val.kept is None
    first = list(val())
    assert shard.passes == 2 and len(val.kept) == N_VAL
    assert same_batches(first, list(val())) and shard.passes == 2


def train_loop(config):
    """One pass over two epochs of batches, a validation pass in the middle; writes what this
    worker saw, and reports a checkpoint as training does (rank 0 attaches it)."""
    import tempfile

    import ray.train
    params = config["params"]
    counts = {"train": 0, "val": 0}
    for step, (images, labels) in enumerate(iter_train_batches(ray.train.get_dataset_shard("train"), params)):
        assert images.shape[1:] == (3, CROP, CROP) and labels.shape[1:] == (CROP, CROP)
        counts["train"] += images.shape[0]
        if step == 4:
            # Validation in the middle of the second epoch, as training does: both pipelines run at once.
            for val_images, _ in iter_val_batches(ray.train.get_dataset_shard("val"), params):
                counts["val"] += val_images.shape[0]
    rank = ray.train.get_context().get_world_rank()
    (Path(config["out"]) / f"counts-{rank}.json").write_text(json.dumps(counts))
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "weights").write_text("none")
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report({"iteration": 5, "rank": rank}, checkpoint=checkpoint)


def test_two_training_workers_holding_most_cpus_do_not_starve_the_pipeline(shards, ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    root, rows = shards
    params = make_params(root)  # 2 workers x 0.75 CPU + 0.5 CPU for Ray Data = the machine's 2
    assert ray_local.cluster_resources()["CPU"] == 2
    datasets = build_datasets(params, epochs=2)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"params": params, "out": str(tmp_path)}, datasets=datasets,
        dataset_config=data_config(params),
        scaling_config=ScalingConfig(num_workers=params.ray.num_workers,
                                     resources_per_worker={"CPU": params.ray.cpus_per_worker}),
        run_config=RunConfig(name="dataset-test", storage_path=str(tmp_path / "ray_results")),
    )
    outcome = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except Exception as err:  # reported below, in the test's thread
            outcome["error"] = err

    # pytest imports this file under a name Ray's workers cannot import: send the loop by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runner = threading.Thread(target=fit, daemon=True)
    runner.start()
    runner.join(timeout=300)
    assert not runner.is_alive(), "training did not finish in 300 s: the data pipeline is starved of CPUs"
    assert "error" not in outcome, outcome.get("error")
    counts = [json.loads((tmp_path / f"counts-{rank}.json").read_text()) for rank in range(2)]
    # train: 2 epochs split equally, 24 rows a worker, 6 full batches of 4; val: every image, once.
    assert [c["train"] for c in counts] == [24, 24]
    assert sum(c["val"] for c in counts) == N_VAL
    assert outcome["result"].error is None

    # A worker group started for this run now resumes after iteration 5 (the checkpoint),
    # in epoch 5 x 8 // 24 = 1: the factory plans from there, for the 7 steps left of 12.
    run_dir = tmp_path / "ray_results" / "dataset-test"
    assert checkpoint_iteration(str(run_dir)) == 5 and checkpoint_iteration(str(tmp_path / "no-run")) == 0
    planned = list(TrainDatasetFactory(params, 12, str(run_dir))().iter_batches(batch_size=None))
    epochs = np.concatenate([b["epoch"] for b in planned])
    assert epochs.tolist() == [1] * N_TRAIN + [2] * N_TRAIN + [3] * N_TRAIN + [4] * N_TRAIN
    assert all((b["start_iteration"] == 5).all() for b in planned)
