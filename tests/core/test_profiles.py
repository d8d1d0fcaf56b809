"""conf/: the Hydra profiles DVC composes into params.yaml (`dvc exp run -S profile=...`).

Composed with DVC's own function, as `dvc exp run` does it.
"""
import re

import yaml
from dvc.utils.hydra import compose_and_dump

from pipelines.commands import demo
from pipelines.core.params import PROJECT_ROOT, load_params, parse_params
from pipelines.data.synthetic import write_mirror

CONF = PROJECT_ROOT / "conf"


def compose(tmp_path, *overrides: str) -> dict:
    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(CONF), None, "config", str(tmp_path), list(overrides))
    return yaml.safe_load(out.read_text())


def test_committed_params_are_the_default_profile_composed(tmp_path):
    committed = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    assert compose(tmp_path) == committed
    assert compose(tmp_path, "profile=full") == committed


def test_demo_profile_is_valid_offline_and_keeps_its_data_apart(tmp_path):
    full = load_params(PROJECT_ROOT / "params.yaml")
    demo = parse_params(compose(tmp_path, "profile=demo"), "demo profile")
    data = demo.data
    # Offline: the archives come from the generated mirror only, by a path relative to
    # the project root (params paths are relative to params.yaml's directory).
    assert data.voc.mirrors == [] and data.sbd.mirrors == []
    assert not data.local_dir.startswith("/")
    resolved = parse_params(compose(tmp_path, "profile=demo"), "demo profile", root=PROJECT_ROOT).data
    assert resolved.local_dir == str(PROJECT_ROOT / data.local_dir)
    # Never the full profile's data directories: DVC deletes a stage's outs before it runs.
    for key in ("download_dir", "raw_dir", "shards_dir", "stats_file", "rejected_file"):
        assert getattr(resolved, key) != getattr(full.data, key), key
    assert demo.model.width < full.model.width
    assert demo.train.loss == "mean"
    for stage in ("fcn32s", "fcn16s", "fcn8s"):
        assert demo.train.stages[stage].iterations < full.train.stages[stage].iterations
        assert demo.train.stages[stage].init == full.train.stages[stage].init


def test_demo_profile_md5s_are_those_of_the_mirror_make_demo_writes(tmp_path):
    mirror = write_mirror(tmp_path / "mirror", **demo.MIRROR)
    profile = parse_params(compose(tmp_path, "profile=demo"), "demo profile")
    assert profile.data.voc.md5 == mirror["md5"]["voc"]
    assert profile.data.sbd.md5 == mirror["md5"]["sbd"]
    assert demo.MIRROR_DIR == profile.data.local_dir
    # Crops of the mirror's largest side: whole images, padded, four a step.
    if profile.train.batch_mode == "crops":
        assert profile.augment.crop_size == demo.MIRROR["max_side"]
    assert "fcn demo" in (PROJECT_ROOT / "Makefile").read_text()


def test_caffe_profile_is_the_full_run_from_the_references_imagenet_start(tmp_path):
    """Two keys apart from the full profile: Caffe's VGG16 classifier and its input convention."""
    full = compose(tmp_path, "profile=full")
    caffe = compose(tmp_path, "profile=caffe")
    differing = {(section, key) for section in full for key in full[section]
                 if caffe[section].get(key) != full[section][key]}
    assert differing == {("model", "imagenet_weights"), ("model", "input_norm")}
    params = parse_params(caffe, "caffe profile", root=PROJECT_ROOT)
    assert params.model.input_norm == "caffe-bgr"
    assert params.model.imagenet_weights == str(PROJECT_ROOT / "models" / "imagenet" / "vgg16_caffe.pth")
