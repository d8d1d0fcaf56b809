"""What decides a stage's result, from one list: the run name, the MLflow params, and GoogLeNet's input.

tests/core/test_architecture.py ties the same list to dvc.yaml; here each of its knobs
must move the Ray run name, each must be among the MLflow params, and no other knob
may move the name (a knob that made DVC re-run the stage without changing the run
would resume the finished run and train nothing).
"""
import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch

from fcn_models.norms import BACKBONE_NORMS, TORCHVISION_GOOGLENET, TORCHVISION_RGB
from pipelines.core.params import PROJECT_ROOT, input_norm
from pipelines.data import batches, dataset, shards
from pipelines.data.shards import SPLITS, shard_files
from pipelines.track import provenance
from pipelines.train import loop, recipe
from support.training import make_params, write_shards

STAGES = {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 10},
          "fcn16s": {"init": "fcn32s", "lr": 1e-3, "iterations": 10}}
RANDOM = recipe.StageInit(source="random", path=None, note="random")

# A different valid value for each leaf of RESULT_PARAMS.
CHANGED = {
    "train.stages.fcn32s.init": "fcn16s", "train.stages.fcn32s.lr": 2e-3, "train.stages.fcn32s.fixed": True,
    "train.stages.fcn32s.lr_step_at": 5,
    "train.seed": 1, "train.batch_mode": "crops", "train.batch_size": 4, "train.scaling": "linear",
    "train.warmup_images": 100,
    "train.loss": "sum",
    "train.optimizer": "adam", "train.momentum": 0.5, "train.weight_decay": 0.1, "train.amp": False,
    "train.cpu_amp": True,
    "train.val_every": 3,
    "model.backbone": "alexnet", "model.width": 0.5, "model.num_classes": 5,
    "model.imagenet_weights": "other/vgg16.pth", "model.input_norm": "caffe-bgr",
    "augment.scale_min": 0.5, "augment.scale_max": 2.0, "augment.crop_size": 64, "augment.hflip": 0.0,
    "ray.num_workers": 3, "ray.use_gpu": True,
}
# Knobs of how a stage runs: none may change its run.
NOT_DECIDING = {
    "train.log_every": 7, "train.checkpoints_to_keep": 5, "train.models_dir": "elsewhere/models",
    "train.reports_dir": "elsewhere/reports", "train.stages.fcn32s.iterations": 99,
    "ray.cpus_per_worker": 0.25, "ray.data_cpus": 0.25, "ray.max_failures": 9, "ray.storage_path": "elsewhere",
    "ray.address": "auto", "data.workers": 3, "evaluate.timing_images": 3, "mlflow.experiment": "other",
}


def nested(dotted: str, value) -> dict:
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def params_with(root, dotted=None, value=None):
    base = {"train": {"stages": STAGES}}
    if dotted == "train.batch_size":  # batches of more than one need crops
        base = merge(base, {"train": {"batch_mode": "crops"}})
    mapping = merge(base, nested(dotted, value)) if dotted else base
    params = make_params(root, mapping["train"].pop("stages"))
    from pipelines.core.params import parse_params

    raw = dataclasses.asdict(params)
    return parse_params(merge(raw, mapping), "test", root=root)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    write_shards(root / "shards")
    return root


def test_every_leaf_of_the_result_params_is_covered_here(root):
    leaves = set(recipe.result_params(params_with(root), "fcn32s"))
    assert leaves == set(CHANGED) | {"train.stages.fcn32s.iterations"}


@pytest.mark.parametrize("dotted", sorted(CHANGED))
def test_a_knob_that_decides_the_result_changes_the_run(root, dotted):
    base = recipe.run_name(params_with(root), "fcn32s", RANDOM, root)
    changed = params_with(root, dotted, CHANGED[dotted])
    assert recipe.result_params(changed, "fcn32s")[dotted] != recipe.result_params(params_with(root), "fcn32s")[dotted]
    assert recipe.run_name(changed, "fcn32s", RANDOM, root) != base


@pytest.mark.parametrize("dotted", sorted(NOT_DECIDING))
def test_a_knob_of_how_it_runs_keeps_the_run(root, dotted):
    base = recipe.run_name(params_with(root), "fcn32s", RANDOM, root)
    assert recipe.run_name(params_with(root, dotted, NOT_DECIDING[dotted]), "fcn32s", RANDOM, root) == base


def test_another_stages_entry_does_not_change_this_stages_run(root):
    base = recipe.run_name(params_with(root), "fcn32s", RANDOM, root)
    assert recipe.run_name(params_with(root, "train.stages.fcn16s.lr", 0.5), "fcn32s", RANDOM, root) == base


def test_the_run_follows_the_shards_and_the_starting_weights_not_stray_files(root, tmp_path):
    params = params_with(root)
    base = recipe.run_name(params, "fcn32s", RANDOM, root)
    # A temp folder a killed preprocess leaves beside the shards is not part of them.
    stray = root / "shards" / "train" / ".train.tmp-123"
    stray.mkdir()
    (stray / "part-00000.parquet").write_bytes(b"half")
    try:
        assert recipe.run_name(params, "fcn32s", RANDOM, root) == base
    finally:
        (stray / "part-00000.parquet").unlink()
        stray.rmdir()
    # A shard rewritten to the same size with other bytes is other data.
    shard = root / "shards" / "val" / "part-00000.parquet"
    original = shard.read_bytes()
    shard.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    try:
        assert recipe.run_name(params, "fcn32s", RANDOM, root) != base
    finally:
        shard.write_bytes(original)
    assert recipe.run_name(params, "fcn32s", RANDOM, root) == base
    weights = tmp_path / "vgg16.pth"
    weights.write_bytes(b"one")
    first = recipe.run_name(params, "fcn32s", recipe.StageInit(source="imagenet", path=str(weights), note=""), root)
    weights.write_bytes(b"two")
    assert recipe.run_name(params, "fcn32s", recipe.StageInit(source="imagenet", path=str(weights), note=""), root) != first


def test_the_mlflow_run_records_exactly_the_result_params(root):
    params = params_with(root)
    logged = recipe.stage_params(params, "fcn32s")
    expected = {k.replace("train.stages.fcn32s.", "stage."): str(v)
                for k, v in recipe.result_params(params, "fcn32s").items()}
    # Beside them, what train.scaling derived from them (none: the same values).
    derived = {f"derived.{k}": v for k, v in
               {"global_batch": "2", "lr": "0.001", "iterations": "10", "val_every": "2",
                "warmup_iterations": "0", "momentum": str(params.train.momentum), "beta2": "0.999",
                "lr_step_iteration": "0"}.items()}
    assert logged == {**expected, **derived}
    assert logged["stage.lr"] == "0.001" and logged["train.val_every"] == "2"
    # Runs of different stages share their keys.
    assert set(recipe.stage_params(params, "fcn16s")) == set(logged)


def test_googlenet_trains_on_its_own_normalisation(root):
    """One training step of FCN-GoogLeNet through the stage's code: the normalisation the
    batches get and the one the network and its checkpoint carry are GoogLeNet's own."""
    params = params_with(root, "model.backbone", "googlenet")
    assert params.model.input_norm is None
    assert input_norm(params) == TORCHVISION_GOOGLENET == BACKBONE_NORMS["googlenet"]
    config = loop.stage_config(params, "fcn32s", RANDOM)
    worker = loop.StageWorker(config, torch.device("cpu"))
    assert worker.net.input_norm == TORCHVISION_GOOGLENET
    # The batches: decoded and normalised as the training pipeline does, without Ray.
    rows = {"id": ["a"], "image": [], "label": []}
    import io

    import numpy as np
    from PIL import Image

    image = np.full((40, 48, 3), 200, np.uint8)
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(jpeg, "JPEG", quality=100)
    Image.fromarray(np.ones((40, 48), np.uint8)).save(png, "PNG")
    rows["image"], rows["label"] = [jpeg.getvalue()], [png.getvalue()]
    decoded = dataset.DecodeAugment(params, augment=False)(rows)
    images, labels = batches.to_model_input(decoded["image"], decoded["label"], params)
    # 200 on the 0-255 scale is (200/255 - 0.5) / 0.5 in GoogLeNet's normalisation, not
    # (200/255 - 0.485) / 0.229 (torchvision's ImageNet one).
    assert images.mean().item() == pytest.approx((200 / 255 - 0.5) / 0.5, abs=0.02)
    assert abs(images.mean().item() - (200 / 255 - TORCHVISION_RGB.mean[0]) / TORCHVISION_RGB.std[0]) > 0.3
    before = {n: p.detach().clone() for n, p in worker.net.named_parameters() if p.requires_grad}
    loss = worker.train_step(images, labels)
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in worker.net.named_parameters() if n in before)
    worker.save(root / "googlenet-checkpoint", 1, worker.validate([(images, labels)]).scores(),
                worker.validate([(images, labels)]))
    from fcn_models.checkpoint import read_meta

    assert read_meta(root / "googlenet-checkpoint")["input_norm"]["name"] == TORCHVISION_GOOGLENET.name


def test_the_shards_fingerprint_is_the_digest_of_the_shard_files(root):
    """The run name's shards entry from the shared read equals its definition over the files."""
    shards_dir = root / "shards"
    for split in SPLITS:
        files = shard_files(shards_dir, split)
        assert recipe.shards_fingerprint(shards_dir, split) == recipe._digest(files, shards_dir / split)


def test_a_stage_start_reads_each_shard_once_for_its_three_hashes(tmp_path, monkeypatch):
    """Run name, DVC md5 of the shards and of each split: one read of every shard file."""
    shards_dir = tmp_path / "shards"
    write_shards(shards_dir)
    files = [p for p in shards_dir.rglob("*.parquet")]
    for path in files:
        os.utime(path, (time.time() - 3600,) * 2)  # not just written: its digest may be kept
    reads = []

    def counting_open(path, *args, **kwargs):
        reads.append(Path(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(shards, "open", counting_open, raising=False)
    params = make_params(tmp_path, STAGES)
    recipe.run_name(params, "fcn32s", RANDOM, tmp_path)
    provenance.shards_hash(shards_dir, tmp_path)
    datasets = provenance.shard_datasets(shards_dir)
    assert sorted(reads) == sorted(files)
    assert [d["digest"] for d in datasets] == [provenance.compute_shards_hash(shards_dir, s) for s in SPLITS]


def test_the_stage_config_is_frozen_and_travels_to_the_workers_as_it_is(root):
    import pickle

    from pipelines.track.metrics_log import RunTarget
    from pipelines.train import trainer

    config = loop.stage_config(params_with(root), "fcn32s", RANDOM)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    # The run's handles travel beside it, never in it.
    handles = trainer.WorkerHandles(RunTarget("sqlite:////tmp/mlflow.db", "0" * 32), None, str(root / "trace"))
    assert pickle.loads(pickle.dumps(trainer.worker_config(config, handles))) == {"stage": config, "handles": handles}


def test_the_code_in_the_run_name_is_every_file_dvc_hashes_for_the_stage():
    files = {str(p.relative_to(PROJECT_ROOT)) for p in recipe.code_files()}
    assert "fcn_models/voc_classes.txt" in files and "pipelines/train/loop.py" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]

