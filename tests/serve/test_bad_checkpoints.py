"""A broken checkpoint, or one of another network, in every stage that reads one: one line naming
the file and what is wrong with it, exit status 1, nothing scored, trained or registered from it."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from fcn_models.checkpoint import save_checkpoint
from fcn_models.fcn import build_fcn
from fcn_models.limits import MAX_WIDTH
from pipelines.commands import predict, predict_batch
from pipelines.stages import evaluate, register, train
from support.checkpoints import break_file
from support.limited import MiB, run_fcn
from support.stages import one_line, stage
from support.training import WIDTH, write_shards

BROKEN = ("empty", "truncated", "code-carrying")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "shards", n_train=1, n_val=3)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "data": {"shards_dir": "shards"}, "model": {"width": WIDTH, "imagenet_weights": None},
        "evaluate": {"stages": ["fcn8s"], "timing_images": 1}}))
    return tmp_path






@pytest.mark.parametrize("how", BROKEN)
def test_evaluate_names_a_broken_checkpoint(project, how):
    save_checkpoint(project / "models" / "fcn8s", build_fcn("fcn8s", width=WIDTH), {"stage": "fcn8s"})
    break_file(project / "models" / "fcn8s", how, project)
    status, err = stage(evaluate.main, "--params", str(project / "params.yaml"), "--device", "cpu")
    assert status == 1
    line = one_line(err)
    assert line.startswith(f"evaluate: stage fcn8s: {project / 'models' / 'fcn8s' / 'model.pt'} ")
    assert line.endswith("retrain it with `fcn train --stage fcn8s` (or `dvc repro train@fcn8s`)")
    assert not (project / "reports").exists() and not (project / "pwned").exists()


@pytest.mark.parametrize("how", BROKEN)
def test_train_names_a_broken_starting_checkpoint(project, how):
    save_checkpoint(project / "models" / "fcn32s", build_fcn("fcn32s", width=WIDTH), {"stage": "fcn32s"})
    break_file(project / "models" / "fcn32s", how, project)
    status, err = stage(train.main, "--stage", "fcn16s", "--params", str(project / "params.yaml"))
    assert status == 1
    line = one_line(err)
    assert line.startswith(f"train: cannot start fcn16s from fcn32s ({project / 'models' / 'fcn32s'}): "
                           f"{project / 'models' / 'fcn32s' / 'model.pt'} ")
    assert not (project / "mlflow.db").exists() and not (project / "pwned").exists()


@pytest.mark.parametrize("how", BROKEN)
def test_predict_names_a_broken_checkpoint(project, how):
    save_checkpoint(project / "ckpt", build_fcn("fcn8s", width=WIDTH), {})
    break_file(project / "ckpt", how, project)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(project / "photo.png")
    status, err = stage(predict.main, str(project / "photo.png"), "--model", str(project / "ckpt"),
                        "--out", str(project / "out"))
    assert status == 1
    assert one_line(err).startswith(f"predict: model {project / 'ckpt'}: {project / 'ckpt' / 'model.pt'} ")
    assert not (project / "out").exists() and not (project / "pwned").exists()


def _relabelled(directory, **meta_changes):
    """A tiny FCN-32s checkpoint whose meta.json then says something else."""
    save_checkpoint(directory, build_fcn("fcn32s", width=WIDTH), {})
    meta = json.loads((directory / "meta.json").read_text())
    (directory / "meta.json").write_text(json.dumps({**meta, **meta_changes}))
    return directory


# Enough for torch and a tiny network; the width-4.0 VGG16 meta.json describes needs 8 GB.
EXPORT_LIMIT = 4096 * MiB


def test_a_meta_json_wider_than_its_weights_is_refused_before_the_network_is_allocated(tmp_path):
    checkpoint = _relabelled(tmp_path / "ckpt", width=4.0)
    result = run_fcn(["export", checkpoint, "--onnx", tmp_path / "out.onnx"], EXPORT_LIMIT, cwd=tmp_path)
    err = one_line(result.stderr)
    assert result.returncode == 1
    assert f"{checkpoint / 'model.pt'} does not match the network meta.json describes (fcn32s, vgg16, width 4.0" in err
    assert "trunk.conv1_1.weight (4, 3, 3, 3) where it needs (256, 3, 3, 3)" in err and f"width {WIDTH:g}" in err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("width", [9.0, 1e30, -1])
def test_a_width_past_the_bound_is_refused_naming_the_bound(project, width):
    checkpoint = _relabelled(project / "ckpt", width=width)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(project / "photo.png")
    status, err = stage(predict.main, str(project / "photo.png"), "--model", str(checkpoint),
                        "--out", str(project / "out"))
    assert status == 1
    assert f"{checkpoint / 'meta.json'}: width {float(width)!r} is outside (0, {MAX_WIDTH:g}]" in one_line(err)


@pytest.mark.parametrize("how", BROKEN)
def test_predict_batch_names_a_broken_checkpoint_before_ray_starts(project, how):
    save_checkpoint(project / "ckpt", build_fcn("fcn8s", width=WIDTH), {})
    break_file(project / "ckpt", how, project)
    (project / "photos").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(project / "photos" / "photo.png")
    status, err = stage(predict_batch.main, str(project / "photos"), "--model", str(project / "ckpt"),
                        "--out", str(project / "out"), "--params", str(project / "params.yaml"))
    assert status == 1
    assert one_line(err).startswith(f"predict-batch: model {project / 'ckpt'}: {project / 'ckpt' / 'model.pt'} ")
    assert not (project / "out").exists() and not (project / "pwned").exists()


@pytest.mark.parametrize("name, network, says", [
    ("fcn8s", ("fcn32s", "vgg16"), "says its network is fcn32s, but {dir} must hold an fcn8s"),
    ("fcn-alexnet", ("fcn32s", "vgg16"), "says its trunk is vgg16, but {dir} must hold a caffe-alexnet network"),
])
def test_a_reference_of_another_network_is_refused_by_evaluate_and_register(project, name, network, says):
    from pipelines.core.params import load_params
    from pipelines.registry.publish import RegisterError, evaluated_scores

    directory = project / "models" / "reference" / name
    save_checkpoint(directory, build_fcn(network[0], network[1], width=WIDTH), {})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["references"] = [name]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    wrong = f"{directory / 'meta.json'} " + says.format(dir=directory)
    status, err = stage(evaluate.main, "--params", str(project / "params.yaml"), "--device", "cpu")
    assert status == 1
    assert one_line(err) == (f"evaluate: stage reference-{name}: {wrong}; import it again with "
                             f"`fcn import SOURCE --out {directory}`")
    assert not (project / "reports").exists()
    with pytest.raises(RegisterError) as refused:
        evaluated_scores(load_params(project / "params.yaml"), f"reference-{name}", directory)
    assert str(refused.value).startswith(f"{wrong}; ")


def test_a_checkpoint_of_another_network_is_refused_by_evaluate_register_and_train(project):
    # An FCN-32s where FCN-8s belongs, and an FCN-8s where FCN-32s belongs.
    save_checkpoint(project / "models" / "fcn8s", build_fcn("fcn32s", width=WIDTH), {"stage": "fcn8s"})
    save_checkpoint(project / "models" / "fcn32s", build_fcn("fcn8s", width=WIDTH), {"stage": "fcn32s"})
    params = str(project / "params.yaml")
    wrong = f"{project / 'models' / 'fcn8s' / 'meta.json'} says its network is fcn32s, but " \
            f"{project / 'models' / 'fcn8s'} must hold an fcn8s"

    status, err = stage(evaluate.main, "--params", params, "--device", "cpu")
    assert status == 1 and one_line(err) == (f"evaluate: stage fcn8s: {wrong}; retrain it with "
                                             "`fcn train --stage fcn8s` (or `dvc repro train@fcn8s`)")
    status, err = stage(register.main, "--params", params)
    assert status == 1 and one_line(err).startswith(f"register: {wrong}; train that stage first")
    status, err = stage(train.main, "--stage", "fcn16s", "--params", params)
    assert status == 1 and f"says its network is fcn8s, but {project / 'models' / 'fcn32s'} must hold an fcn32s" \
        in one_line(err)
    assert not (project / "reports").exists() and not (project / "mlflow.db").exists()
