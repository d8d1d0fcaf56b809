"""The register stage against a real local MLflow store (SQLite and artifacts under tmp).

One module store takes four versions of a width-0.0625 FCN-8s in turn, each from a
run standing in for the training run that made it (named in the checkpoint's
meta.json, as training writes it) and each with its scores in the evaluation report
(as the evaluate stage writes them): the first takes the alias, a worse and a tied
one leave it, a better one moves it. The champion is then loaded by URI in a fresh
Python process that cannot import this project, and its masks compared with the
checkpoint's own.
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from support.shard_rows import sample_row, write_split

from fcn_models.checkpoint import load_checkpoint, save_checkpoint
from pipelines.core.files import file_sha256
from pipelines.core.params import PROJECT_ROOT, parse_params
from pipelines.data.shards import shard_path
from pipelines.registry import publish as register
from pipelines.stages import register as register_stage
from pipelines.track import metrics_log, provenance, store
from support.checkpoints import checkpoint_mask, make_checkpoint, write_evaluation
from support.training import WIDTH, write_shards

SCORE_NAMES = ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")








def decode_val_image(shards_dir: Path, image_id: str) -> np.ndarray:
    table = pq.read_table(shard_path(shards_dir / "val", 0)).to_pydict()
    jpeg = table["image"][table["id"].index(image_id)]
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


# --------------------------------------------------------------------------- one store, four versions

# mean IU of each version in turn, and whether it takes the alias.
SEQUENCE = ((0.40, "promoted"), (0.30, "kept"), (0.40, "kept"), (0.55, "promoted"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("project")
    write_shards(root / "data" / "shards", n_train=2, n_val=3)
    # Every path at its default, relative to root: mlflow.db, mlartifacts, models/fcn8s, reports/registry.json.
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump({"model": {"width": WIDTH}}))
    params = parse_params({"model": {"width": WIDTH}}, root=root)
    checkpoint = Path(params.train.models_dir) / params.mlflow.register_stage
    copies, scores, records, training_runs = [], [], [], []
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        client = MlflowClient(tracking_uri=store.tracking_uri(params))
        experiment_id = store.set_up(params)
        for seed, (mean_iu, _) in enumerate(SEQUENCE, start=1):
            run = client.create_run(experiment_id, run_name=f"fcn8s-trained-{seed}", tags={"fcn.stage": "fcn8s"})
            client.set_terminated(run.info.run_id, "FINISHED")
            training_runs.append(run.info.run_id)
            scores.append(make_checkpoint(checkpoint, seed, mean_iu, run.info.run_id))
            write_evaluation(params, "fcn8s", checkpoint, scores[-1])
            copies.append(root / "copies" / f"v{seed}")
            save_checkpoint(copies[-1], load_checkpoint(checkpoint)[0], {"stage": "fcn8s"})
            assert register_stage.main(["--params", str(params_file)]) == 0
            records.append(json.loads((root / "reports" / "registry.json").read_text()))
        yield {"root": root, "params": params, "copies": copies, "scores": scores, "records": records,
               "uri": store.tracking_uri(params), "training_runs": training_runs}


def test_alias_moves_only_to_a_better_version(registry):
    from mlflow import MlflowClient

    records = registry["records"]
    assert [r["new_version"] for r in records] == [1, 2, 3, 4]
    assert [r["decision"] for r in records] == [decision for _, decision in SEQUENCE]
    assert [r["new_mean_iu"] for r in records] == [mean_iu for mean_iu, _ in SEQUENCE]
    # Before each registration: no champion, then version 1 (0.40) three times.
    assert [r["champion_version_before"] for r in records] == [None, 1, 1, 1]
    assert [r["champion_mean_iu_before"] for r in records] == [None, 0.40, 0.40, 0.40]
    assert [r["champion_version"] for r in records] == [1, 1, 1, 4]
    assert [r["champion_mean_iu"] for r in records] == [0.40, 0.40, 0.40, 0.55]

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    assert int(client.get_model_version_by_alias("fcn-voc", "champion").version) == 4
    for version, (mean_iu, _) in enumerate(SEQUENCE, start=1):
        held = client.get_model_version("fcn-voc", str(version))
        # The worse and the tied versions exist, without the alias.
        assert held.aliases == (["champion"] if version == 4 else [])
        assert float(held.tags["mean_iu"]) == mean_iu
        assert held.tags["stage"] == "fcn8s"


def test_each_version_comes_from_the_run_that_trained_its_weights(registry):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    experiment = client.get_experiment_by_name(registry["params"].mlflow.experiment)
    for record, trained_in, copy in zip(registry["records"], registry["training_runs"], registry["copies"]):
        assert record["run_id"] == trained_in
        run = client.get_run(trained_in)
        assert run.info.experiment_id == experiment.experiment_id and run.info.status == "FINISHED"
        version = client.get_model_version("fcn-voc", str(record["new_version"]))
        assert version.run_id == trained_in
        # The version and its run name the weights it holds.
        assert version.tags["weights_sha256"] == run.data.tags["weights_sha256"] == file_sha256(copy / "model.pt")
    # No run of its own: every run is a training run.
    assert len(client.search_runs([experiment.experiment_id])) == len(registry["records"])
    # The store and its artifacts are the project's own, at the default paths.
    assert registry["uri"] == f"sqlite:///{registry['root'] / 'mlflow.db'}"
    assert any((registry["root"] / "mlartifacts").rglob("MLmodel"))


def test_the_version_is_described_by_its_model_card(registry):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    record, scores = registry["records"][3], registry["scores"][3]
    version = client.get_model_version("fcn-voc", str(record["new_version"]))
    card = version.description
    run = client.get_run(record["run_id"])
    # What the model is, the weights it holds, where it was trained, on what, how well, how to call it.
    assert card.startswith("# fcn-voc version 4: FCN-8s, vgg16 trunk at width 0.0625")
    assert "background, aeroplane, bicycle" in card and "tvmonitor" in card
    assert record["weights_sha256"] in card and run.info.run_name in card and record["run_id"] in card
    # The params name the official archives' md5s (the defaults).
    assert "PASCAL VOC 2012 and SBD, the official archives VOCtrainval_11-May-2012.tar (md5 6cd6e144" in card
    train_rows = f"| train | 2 | sbd 2 | `{provenance.compute_shards_hash(registry['root'] / 'data' / 'shards', 'train')}` |"
    assert train_rows in card
    assert f"| **fcn8s** (this version) | {100 * scores['pixel_acc']:.1f} | {100 * scores['mean_acc']:.1f} | " \
           f"{100 * scores['mean_iu']:.1f} | {100 * scores['fw_iu']:.1f} |" in card
    assert 'mlflow.pyfunc.load_model("models:/fcn-voc/4")' in card and "uint8" in card
    # The registered model and the experiment say what they are.
    model = client.get_registered_model("fcn-voc")
    assert "21 PASCAL VOC classes" in model.description and "models:/fcn-voc@champion" in model.description
    experiment = client.get_experiment_by_name("fcn-voc")
    assert "FCN-32s > FCN-16s > FCN-8s" in experiment.tags["mlflow.note.content"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The card is an artifact of the run and of the model; the ONNX export travels with the version.
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert (artifacts / "model_card.md").read_text() == card
    logged = client.get_logged_model(record["model_id"])
    model_files = Path(logged.artifact_location.removeprefix("file://"))
    assert (model_files / "model_card.md").read_text() == card
    assert (model_files / "artifacts" / "model.onnx").stat().st_size > 10_000


def test_the_card_tells_the_demo_mirror_from_the_official_archives():
    from pipelines.registry.modelcard import data_origin

    demo = yaml.safe_load((PROJECT_ROOT / "conf" / "profile" / "demo.yaml").read_text())["data"]
    params = parse_params({"data": {"voc": {"filename": "VOCtrainval_11-May-2012.tar", "md5": demo["voc"]["md5"]},
                                    "sbd": {"filename": "benchmark.tgz", "md5": demo["sbd"]["md5"]}}})
    assert "not the official releases: the generated VOC/SBD-format mirror of `fcn demo-data`" in data_origin(params)
    assert data_origin(parse_params({})).startswith("PASCAL VOC 2012 and SBD, the official archives")


def test_the_logged_model_comes_from_the_training_run_with_its_weights_and_scores(registry):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    for record, scores in zip(registry["records"], registry["scores"]):
        logged = client.get_logged_model(record["model_id"])
        assert logged.source_run_id == record["run_id"]
        assert logged.tags["weights_sha256"] == record["weights_sha256"]
        assert logged.params["model.width"] == "0.0625" and logged.params["model.backbone"] == "vgg16"
        linked = {m.key: (m.value, m.step) for m in logged.metrics}
        # At the checkpoint's iteration (10), not at a step 0 of no training.
        assert linked["eval/mean_iu"] == (pytest.approx(scores["mean_iu"]), 10)
        version = client.get_model_version("fcn-voc", str(record["new_version"]))
        assert version.source == f"models:/{record['model_id']}"


# A fresh interpreter that cannot import this project: the editable install's finder
# is dropped and the working directory is elsewhere, so only the model's own code serves.
FRESH_PROCESS = r"""
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("pipelines") is None and importlib.util.find_spec("fcn_models") is None
import mlflow
import numpy as np
store, uri, image_file, mask_file, example_file = sys.argv[1:]
mlflow.set_tracking_uri(store)
mlflow.set_registry_uri(store)
model = mlflow.pyfunc.load_model(uri)
np.save(mask_file, model.predict(np.load(image_file)))
np.save(example_file, model.input_example)
import fcn_models
print(json.dumps({"fcn_models": fcn_models.__file__,
                  "inputs": str(model.metadata.get_input_schema()),
                  "outputs": str(model.metadata.get_output_schema())}))
"""


def test_champion_loads_in_a_fresh_process_and_predicts_as_its_checkpoint(registry, tmp_path):
    # A size no checkpoint saw (the shards hold 24 x 32 and 20 x 28 images).
    image = np.random.default_rng(7).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, registry["uri"], "models:/fcn-voc@champion",
         str(tmp_path / "image.npy"), str(tmp_path / "mask.npy"), str(tmp_path / "example.npy")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    # fcn_models came with the model, not from this checkout.
    assert not Path(info["fcn_models"]).resolve().is_relative_to(PROJECT_ROOT)
    # The output is declared; the input is checked by the model itself (serving.check_image),
    # since an input signature makes the scoring server cast what it gets.
    assert info["inputs"] == "None" and "(-1, -1)" in info["outputs"] and "uint8" in info["outputs"]

    mask = np.load(tmp_path / "mask.npy")
    champion, worse = registry["copies"][3], registry["copies"][1]
    expected = checkpoint_mask(champion, image)
    assert mask.shape == (45, 61) and mask.dtype == np.uint8
    assert len(np.unique(expected)) >= 2  # a mask with several classes, so equality means something
    np.testing.assert_array_equal(mask, expected)
    assert not np.array_equal(mask, checkpoint_mask(worse, image))

    # The input example is the smallest val image (20 x 28, under the size cap: whole).
    example = np.load(tmp_path / "example.npy")
    np.testing.assert_array_equal(example, decode_val_image(registry["root"] / "data" / "shards", "val_000001"))


def test_export_of_the_champion_and_the_onnx_file_of_its_version(registry, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipelines import cli
    from pipelines.serve.onnx_export import run_onnx

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    image = np.random.default_rng(5).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    expected = checkpoint_mask(registry["copies"][3], image)
    out = tmp_path / "champion.onnx"
    assert cli.main(["export", "models:/fcn-voc@champion", "--onnx", str(out),
                     "--params", str(registry["root"] / "params.yaml")]) == 0
    np.testing.assert_array_equal(run_onnx(out, image)[1], expected)
    # The register stage logged the same network as ONNX with the version.
    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    logged = client.get_logged_model(registry["records"][3]["model_id"])
    logged_onnx = Path(logged.artifact_location.removeprefix("file://")) / "artifacts" / "model.onnx"
    np.testing.assert_array_equal(run_onnx(logged_onnx, image)[1], expected)


def test_a_champion_without_its_score_tag_stops_the_gate(registry):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    assert register.current_champion(client, "fcn-voc", "champion") == {"version": 4, "mean_iu": 0.55}
    assert register.current_champion(client, "fcn-voc", "no-such-alias") is None
    assert register.current_champion(client, "no-such-model", "champion") is None
    # A version given the alias by hand, with no score to compare with.
    client.create_registered_model("untagged")
    source = client.get_model_version("fcn-voc", "1").source
    client.create_model_version("untagged", source, run_id=registry["records"][0]["run_id"])
    client.set_registered_model_alias("untagged", "champion", "1")
    with pytest.raises(register.RegisterError, match=r"version 1 of registered model 'untagged' holds alias "
                                                     r"'champion' but its tag 'mean_iu' is None"):
        register.current_champion(client, "untagged", "champion")


# --------------------------------------------------------------------------- without a store

def test_input_example_is_the_centre_of_the_smallest_val_image(tmp_path):
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 256, shape, dtype=np.uint8)
              for name, shape in (("a", (90, 70, 3)), ("b", (80, 100, 3)), ("c", (120, 40, 3)))}
    # Labels all background: the example is an image alone.
    write_split(tmp_path / "val", [sample_row(name, image, np.zeros(image.shape[:2], np.uint8), source="voc")
                                   for name, image in images.items()], rows_per_file=2)
    example = register.example_image(tmp_path, max_side=64)
    # c has the fewest pixels (4800); its centre 64 rows of 120 start at row 28, all 40 columns.
    with open(shard_path(tmp_path / "val", 1), "rb") as fh:
        jpeg = pq.read_table(fh).column("image")[0].as_py()
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert example.shape == (64, 40, 3) and example.dtype == np.uint8
    np.testing.assert_array_equal(example, decoded[28:92, :40])


def test_a_checkpoint_without_a_training_run_gets_a_run_holding_its_scores(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "data" / "shards", n_train=2, n_val=3)
    params = parse_params({"model": {"width": WIDTH}}, root=tmp_path)
    checkpoint = tmp_path / "models" / "fcn8s"
    scores = make_checkpoint(checkpoint, 5, 0.42, run_id="0123456789abcdef0123456789abcdef")  # not in this store
    write_evaluation(params, "fcn8s", checkpoint, scores)
    record = register.register(params, "fcn8s", checkpoint, register.evaluated_scores(params, "fcn8s", checkpoint),
                               tmp_path)
    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    run = client.get_run(record["run_id"])
    assert run.info.run_name == "register-fcn8s"
    assert {k: run.data.metrics[f"eval/{k}"] for k in SCORE_NAMES} == pytest.approx(scores)
    # Logged at the checkpoint's iteration, nothing under a training metric's name.
    assert {m.step for m in client.get_metric_history(run.info.run_id, "eval/mean_iu")} == {10}
    assert not set(run.data.metrics) & {"loss", *SCORE_NAMES}
    # The network in the training runs' key scheme, the shards as inputs.
    assert run.data.params == {"model.backbone": "vgg16", "model.width": "0.0625", "model.num_classes": "21",
                               "model.input_norm": "torchvision-rgb"}
    inputs = {d.dataset.name: json.loads(d.dataset.profile)["num_rows"] for d in run.inputs.dataset_inputs}
    assert inputs == {"train": 2, "val": 3}
    assert client.get_model_version("fcn-voc", "1").run_id == record["run_id"]


def test_bad_inputs_stop_before_the_store_is_touched(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"model": {"width": WIDTH}}))
    params = parse_params({"model": {"width": WIDTH}}, root=tmp_path)
    checkpoint = tmp_path / "models" / "fcn8s"

    assert register_stage.main(["--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "fcn train --stage fcn8s" in err

    scores = make_checkpoint(checkpoint, 1, 0.5)
    assert register_stage.main(["--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "reports" / "evaluation.json") in err and "fcn evaluate" in err

    # A report of other weights (evaluate has not run since the checkpoint changed).
    write_evaluation(params, "fcn8s", checkpoint, scores)
    make_checkpoint(checkpoint, 2, 0.5)
    assert register_stage.main(["--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert "scored other weights" in err and "fcn evaluate" in err

    write_evaluation(params, "fcn8s", checkpoint, scores)
    assert register_stage.main(["--params", str(params_file)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "data" / "shards" / "val") in err and "fcn preprocess" in err

    assert register_stage.main(["--params", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in capsys.readouterr().err
    # The report written here is the only file under reports/: no registry decision, no store.
    assert not (tmp_path / "mlflow.db").exists()
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["evaluation.json"]


@pytest.mark.parametrize("failure", ["artifact store unwritable", "ctrl-c"])
def test_a_register_that_fails_leaves_the_training_run_as_it_was(tmp_path, capsys, monkeypatch, failure):
    """Register logs into the finished training run; failing half-way must not mark it FAILED.

    The Ctrl-C case is simulated: KeyboardInterrupt raised from the scores' logging, after the
    model is logged, since a real SIGINT cannot be made to land at a known point of it."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "data" / "shards", n_train=2, n_val=3)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"model": {"width": WIDTH}}))
    params = parse_params({"model": {"width": WIDTH}}, root=tmp_path)
    uri = store.tracking_uri(params)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    trained = client.create_run(store.set_up(params), run_name="fcn8s-trained", tags={"fcn.stage": "fcn8s"})
    client.set_terminated(trained.info.run_id, "FINISHED")
    before = client.get_run(trained.info.run_id).info
    checkpoint = tmp_path / "models" / "fcn8s"
    write_evaluation(params, "fcn8s", checkpoint, make_checkpoint(checkpoint, 1, 0.5, trained.info.run_id))
    if failure == "ctrl-c":
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(metrics_log, "evaluation_metrics", interrupted)
        expected_status = 130
    else:
        # A file where the logged models' directory goes: writing the model's artifacts fails (as root too).
        (tmp_path / "mlartifacts").mkdir()
        (tmp_path / "mlartifacts" / "models").write_text("not a directory")
        expected_status = 1

    assert register_stage.main(["--params", str(params_file)]) == expected_status
    assert "register:" in capsys.readouterr().err
    after = client.get_run(trained.info.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)
    assert client.search_registered_models() == []

    # Once the cause is gone, register succeeds, and the run is still as training left it.
    monkeypatch.undo()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if failure != "ctrl-c":
        (tmp_path / "mlartifacts" / "models").unlink()
    assert register_stage.main(["--params", str(params_file)]) == 0
    after = client.get_run(trained.info.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)
    record = json.loads((tmp_path / "reports" / "registry.json").read_text())
    assert record["run_id"] == trained.info.run_id
    # The logged model is in the pipeline's experiment, beside its run.
    assert client.get_logged_model(record["model_id"]).experiment_id == after.experiment_id
