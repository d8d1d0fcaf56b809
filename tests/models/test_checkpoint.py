"""Checkpoint directories: model.pt + meta.json, written atomically, rebuilt from meta."""
import json

import pytest
import torch

from fcn_models import CAFFE_BGR, build_fcn, load_checkpoint, save_checkpoint
from support.checkpoints import RunsCode, break_file
from support.workers import tiny_worker

NARROW = 1 / 16


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model = _perturbed(build_fcn("fcn16s", "alexnet", num_classes=5, width=NARROW, input_norm=CAFFE_BGR)).eval()
    target = tmp_path / "models" / "fcn16s"
    save_checkpoint(target, model, {"stage": "fcn16s", "val": {"mean_iu": 0.5}})

    meta = json.loads((target / "meta.json").read_text())
    assert meta["variant"] == "fcn16s" and meta["backbone"] == "alexnet" and meta["num_classes"] == 5
    assert meta["width"] == NARROW and meta["input_norm"]["name"] == "caffe-bgr"
    assert meta["stage"] == "fcn16s" and meta["val"] == {"mean_iu": 0.5}
    plain = torch.load(target / "model.pt", weights_only=True)
    assert set(plain) == set(model.state_dict())

    loaded, loaded_meta = load_checkpoint(target)
    assert loaded_meta == meta
    assert loaded.input_norm == CAFFE_BGR and loaded.variant == "fcn16s" and loaded.num_classes == 5
    loaded.eval()
    x = torch.randn(1, 3, 41, 37)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.upscore16.weight.requires_grad


def test_overwrite_replaces_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "ckpt"
    save_checkpoint(target, build_fcn("fcn32s", width=NARROW), {"stage": "first"})
    save_checkpoint(target, build_fcn("fcn8s", width=NARROW), {"stage": "second"})
    _, meta = load_checkpoint(target)
    assert meta["stage"] == "second" and meta["variant"] == "fcn8s"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "model.pt"]


def test_failed_save_leaves_nothing(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(TypeError):
        save_checkpoint(target, build_fcn(width=NARROW), {"not_json": object()})
    with pytest.raises(ValueError, match="variant"):
        save_checkpoint(target, build_fcn(width=NARROW), {"variant": "fcn8s"})
    assert list(tmp_path.iterdir()) == []


def test_missing_and_incomplete_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(tmp_path / "nope")
    target = tmp_path / "ckpt"
    save_checkpoint(target, build_fcn(width=NARROW), {})
    (target / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="model.pt is missing"):
        load_checkpoint(target)

    save_checkpoint(target, build_fcn(width=NARROW), {})
    meta = json.loads((target / "meta.json").read_text())
    del meta["backbone"]
    (target / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lacks backbone"):
        load_checkpoint(target)

    (target / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(target)


def test_weights_that_do_not_match_meta_are_refused(tmp_path):
    target = tmp_path / "ckpt"
    save_checkpoint(target, build_fcn("fcn32s", width=NARROW), {})
    meta = json.loads((target / "meta.json").read_text())
    meta["variant"] = "fcn8s"
    (target / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model\.pt does not match.*fcn8s"):
        load_checkpoint(target)
    meta["variant"] = "fcn2s"
    (target / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta\.json.*fcn2s"):
        load_checkpoint(target)


@pytest.mark.parametrize("variant, held", [("fcn8s", "fcn32s, 21 classes"), ("fcn16s", "fcn32s, 21 classes")])
def test_a_meta_json_naming_another_variant_is_one_line_saying_what_the_weights_hold(tmp_path, variant, held):
    target = tmp_path / "ckpt"
    save_checkpoint(target, build_fcn("fcn32s", width=NARROW), {})
    meta = json.loads((target / "meta.json").read_text())
    (target / "meta.json").write_text(json.dumps({**meta, "variant": variant}))
    with pytest.raises(ValueError) as err:
        load_checkpoint(target)
    message = str(err.value)
    assert "\n" not in message and len(message) < 500, message
    assert message.startswith(f"{target / 'model.pt'} does not match the network meta.json describes ({variant}, ")
    assert f"What the weights hold: {held}, trunk.conv1_1.weight (4, 3, 3, 3) (width 0.0625 of a vgg16)" in message

@pytest.mark.parametrize("how, words", [
    ("empty", "is empty (0 bytes)"),
    ("truncated", "is not a readable PyTorch file"),
    ("text", "is not a readable PyTorch file"),
    ("code-carrying", "holds Python objects besides tensors, and unpickling those could run code: refused"),
    ("no state dict", "does not hold a state dict"),
])
def test_broken_weights_are_one_error_naming_the_file_and_never_advise_unsafe_loading(tmp_path, how, words):
    target = tmp_path / "ckpt"
    save_checkpoint(target, build_fcn(width=NARROW), {})
    break_file(target, how, tmp_path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(target)
    message = str(err.value)
    assert message.startswith(f"{target / 'model.pt'} ") and words in message, message
    assert "weights_only" not in message and "\n" not in message
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_of_another_network_is_refused_where_a_variant_is_expected(tmp_path):
    target = tmp_path / "models" / "fcn8s"
    save_checkpoint(target, build_fcn("fcn32s", width=NARROW), {"stage": "fcn32s"})
    with pytest.raises(ValueError, match=r"meta\.json says its network is fcn32s, but .*fcn8s must hold an fcn8s"):
        load_checkpoint(target, variant="fcn8s")
    model, meta = load_checkpoint(target, variant="fcn32s")
    assert model.variant == meta["variant"] == "fcn32s"


@pytest.mark.parametrize("stage, trained", [("fcn8s", "fcn8s"), ("fcn16s-fixed", "fcn16s")])
def test_a_checkpoint_whose_stage_trains_another_network_is_refused_without_an_expected_variant(
        tmp_path, stage, trained):
    from fcn_models.checkpoint import read_meta

    target = tmp_path / "ckpt"
    save_checkpoint(target, build_fcn("fcn32s", width=NARROW), {"stage": stage})
    for read in (read_meta, load_checkpoint):
        with pytest.raises(ValueError) as err:
            read(target)
        assert str(err.value) == (f"{target / 'meta.json'} says its network is fcn32s, but the stage it names, "
                                  f"{stage}, trains an {trained}: the checkpoint is mislabelled; replace it")
    save_checkpoint(target, build_fcn(trained, width=NARROW), {"stage": stage})
    assert load_checkpoint(target)[0].variant == trained
    save_checkpoint(target, build_fcn("fcn32s", width=NARROW), {"stage": "reference-fcn8s"})  # names no stage
    assert load_checkpoint(target)[0].variant == "fcn32s"


@pytest.mark.parametrize("how, words", [
    ("truncated", "is not a readable PyTorch file"),
    ("code-carrying", "holds Python objects besides tensors, and unpickling those could run code: refused"),
])
def test_a_broken_training_state_is_one_error_naming_it_without_unsafe_advice(tmp_path, how, words):

    from fcn_models.metrics import ConfusionMatrix
    from pipelines.train import loop

    worker = tiny_worker(tmp_path)
    matrix = ConfusionMatrix().update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    directory = tmp_path / "ckpt"
    worker.save(directory, 2, matrix.scores(), matrix)
    assert loop.StageWorker(worker.config, "cpu", checkpoint_dir=directory).start == 2
    state_file = directory / loop.TRAIN_STATE_FILE
    if how == "truncated":
        state_file.write_bytes(state_file.read_bytes()[:500])
    else:
        state = torch.load(state_file, weights_only=True)
        torch.save({**state, "payload": RunsCode(tmp_path / "pwned")}, state_file)
    with pytest.raises(ValueError) as err:
        loop.StageWorker(worker.config, "cpu", checkpoint_dir=directory)
    message = str(err.value)
    assert message.startswith(f"{state_file} ") and words in message, message
    assert "weights_only" not in message and "add_safe_globals" not in message and "\n" not in message
    assert not (tmp_path / "pwned").exists()
