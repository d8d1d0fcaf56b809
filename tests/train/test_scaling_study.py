"""`fcn scaling-study`: each configuration's params, the report's numbers, and a real study on Ray.

The real study trains a tiny FCN-32s for two seeds at two global batches (1 whole image, 2
crops) under Adam's square-root rule, on Ray Train, and checks what each run was given, that
both see the same images, and what the report says of them.
"""
import csv
import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipelines import cli
from pipelines.core.errors import UsageError
from pipelines.core.files import file_sha256
from pipelines.track import scaling_report, store
from pipelines.train import scaling, scaling_study
from support.stages import one_line
from support.training import make_params, write_shards

STAGES = {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 8}}


def adam_params(root, workers=2, **knobs):
    return make_params(root, STAGES, workers=workers, optimizer="adam", momentum=0.9, val_every=4, **knobs)


# --------------------------------------------------------------------------- the configurations

@pytest.mark.parametrize("text, workers, images", [("1x1", 1, 1), ("2x1", 2, 1), ("1x4", 1, 4), ("16x8", 16, 8)])
def test_a_configuration_is_workers_x_images(text, workers, images):
    config = scaling_study.parse_config(text)
    assert (config.workers, config.images, config.label) == (workers, images, text)


@pytest.mark.parametrize("text", ["1", "0x1", "1x0", "2X1", "1x1x1", "a x b", "1x1000", ""])
def test_a_bad_configuration_is_refused_naming_it(text):
    with pytest.raises(UsageError, match=f"configuration {text!r}: expected WORKERSxIMAGES"):
        scaling_study.parse_config(text)


def test_each_configuration_gets_the_optimizers_rule_its_batch_its_cpus_and_its_own_directories(tmp_path):
    params = adam_params(tmp_path)  # 2 workers x 0.5 CPUs: 1 CPU to share
    crops = scaling_study.config_params(params, scaling_study.Config(1, 4), warmup_images=8, crop_size=24)
    assert (crops.ray.num_workers, crops.ray.cpus_per_worker) == (1, 1.0)
    assert (crops.train.batch_mode, crops.train.batch_size, crops.augment.crop_size) == ("crops", 4, 24)
    assert (crops.train.scaling, crops.train.warmup_images) == ("sqrt", 8)
    assert Path(crops.train.models_dir) == tmp_path / "models" / "scaling" / "1x4"
    assert Path(crops.train.reports_dir) == tmp_path / "reports" / "scaling" / "1x4"
    derived = scaling.for_stage(crops, "fcn32s")
    assert (derived.lr, derived.iterations, derived.val_every, derived.momentum, derived.warmup_iterations) == (
        pytest.approx(2e-3), 2, 1, pytest.approx(0.6), 2)
    whole = scaling_study.config_params(params, scaling_study.Config(4, 1))
    assert (whole.ray.num_workers, whole.ray.cpus_per_worker, whole.train.batch_mode) == (4, 0.25, "whole")
    assert whole.augment == params.augment and whole.train.warmup_images == params.train.warmup_images
    # Everything else is the params'.
    assert (whole.model, whole.data, whole.train.stages, whole.train.seed) == (
        params.model, params.data, params.train.stages, params.train.seed)
    sgd = make_params(tmp_path, STAGES, optimizer="sgd", momentum=0.9)
    assert scaling_study.config_params(sgd, scaling_study.Config(2, 1)).train.scaling == "linear"


def test_a_configuration_the_rule_cannot_take_is_refused_naming_it_and_the_key(tmp_path):
    with pytest.raises(UsageError, match=r"configuration 1x10: .*train\.momentum = 0\.9: .* = 10, "):
        scaling_study.config_params(adam_params(tmp_path), scaling_study.Config(1, 10))


def test_a_configuration_given_twice_is_refused_before_anything_runs(tmp_path):
    params = adam_params(tmp_path)
    with pytest.raises(UsageError, match="1x1 2x1 1x1: one is given twice"):
        scaling_study.run_study(params, "fcn32s", [scaling_study.parse_config(t) for t in ("1x1", "2x1", "1x1")],
                                [0, 1], tmp_path)
    assert not (tmp_path / "models").exists() and not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------- the report's numbers

def write_history(directory: Path, rows: list[tuple[int, float]]) -> Path:
    directory.mkdir(parents=True)
    with open(directory / "history.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["iteration", "loss", "pixel_acc", "mean_acc", "mean_iu", "fw_iu"])
        for iteration, mean_iu in rows:
            writer.writerow([iteration, 1.0, 0.5, 0.5, mean_iu, 0.5])
    return directory


def test_the_report_compares_final_scores_at_equal_images_with_the_references_seeds(tmp_path):
    runs = {
        "1x1": {"global_batch": 1, "lr": 1e-4, "iterations": 8, "momentum": 0.9, "beta2": 0.999,
                "warmup_iterations": 0,
                "seeds": {0: write_history(tmp_path / "a0", [(4, 0.20), (8, 0.30)]),
                          1: write_history(tmp_path / "a1", [(4, 0.25), (8, 0.34)])}},
        "1x4": {"global_batch": 4, "lr": 2e-4, "iterations": 2, "momentum": 0.6, "beta2": 0.996,
                "warmup_iterations": 1,
                "seeds": {0: write_history(tmp_path / "b0", [(1, 0.10), (2, 0.33)]),
                          1: write_history(tmp_path / "b1", [(1, 0.40), (2, 0.37)])}},
    }
    doc = scaling_report.summarize(runs, "1x1")
    ref, other = doc["configs"]["1x1"], doc["configs"]["1x4"]
    assert ref["final"]["per_seed"] == {0: 0.30, 1: 0.34} and ref["final"]["mean"] == pytest.approx(0.32)
    assert ref["final"]["std"] == pytest.approx(0.04 / 2 ** 0.5)
    assert (ref["images_seen"], other["images_seen"]) == ([8], [8])
    # The final row, not the best: seed 1 of 1x4 peaked at 0.40 before ending at 0.37.
    assert other["final"]["mean"] == pytest.approx(0.35) and other["best"]["mean"] == pytest.approx(0.365)
    assert other["final"]["minus_reference"] == pytest.approx(0.03)
    assert other["final"]["within_reference_range"] is False          # 0.35 is above 0.34
    lines = scaling_report.table_lines(doc)
    assert len(lines) == 4
    assert "| 1x4 | 4 | 0.0002 | 0.6 | 2 | 1 | 8 | 35.0 ± 2.8 | 36.5 ± 4.9 | +3.0 | no |" == lines[3]
    assert "(reference: 30.0 to 34.0)" in lines[2]
    # One seed of 1x4 lower: now inside the reference's seeds.
    write_history(tmp_path / "b2", [(1, 0.1), (2, 0.29)])
    runs["1x4"]["seeds"][1] = tmp_path / "b2"
    assert scaling_report.summarize(runs, "1x1")["configs"]["1x4"]["final"]["within_reference_range"] is True

    paths = tmp_path / "out" / "s.json", tmp_path / "out" / "s.md", tmp_path / "fig" / "s.png"
    scaling_report.write_report(doc, runs, *paths)
    assert json.loads(paths[0].read_text())["configs"]["1x4"]["final"]["per_seed"] == {"0": 0.33, "1": 0.37}
    assert paths[1].read_text().splitlines() == lines
    with Image.open(paths[2]) as picture:
        assert picture.size == (800, 500)


# --------------------------------------------------------------------------- a real study

def test_a_real_study_trains_each_configuration_per_seed_on_the_same_images(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "shards")
    params = adam_params(tmp_path, workers=1)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(params)))))
    code = cli.main(["scaling-study", "--stage", "fcn32s", "--seeds", "0", "1", "--configs", "1x1", "1x2",
                     "--warmup-images", "2", "--crop-size", "32", "--params", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    doc = json.loads((tmp_path / "reports" / "scaling" / "fcn32s.json").read_text())
    one, two = doc["configs"]["1x1"], doc["configs"]["1x2"]
    assert (one["global_batch"], one["iterations"], one["lr"], one["warmup_iterations"]) == (1, 8, 1e-3, 0)
    assert (two["global_batch"], two["iterations"], two["warmup_iterations"]) == (2, 4, 1)
    assert two["lr"] == pytest.approx(1e-3 * 2 ** 0.5) and (two["momentum"], two["beta2"]) == (
        pytest.approx(0.8), pytest.approx(0.998))
    assert one["images_seen"] == two["images_seen"] == [8]
    for label, iterations in (("1x1", [4, 8]), ("1x2", [2, 4])):
        weights = set()
        for seed in (0, 1):
            reports = tmp_path / "reports" / "scaling" / label / "seeds" / f"seed-{seed}" / "fcn32s"
            with open(reports / "history.csv") as fh:
                rows = list(csv.DictReader(fh))
            assert [int(row["iteration"]) for row in rows] == iterations
            assert doc["configs"][label]["final"]["per_seed"][str(seed)] == pytest.approx(float(rows[-1]["mean_iu"]))
            weights.add(file_sha256(tmp_path / "models" / "scaling" / label / "seeds" / f"seed-{seed}" / "fcn32s"
                                    / "model.pt"))
        assert len(weights) == 2  # each seed trained its own network
    # The pipeline's own outputs are not touched.
    assert not (tmp_path / "models" / "fcn32s").exists() and not (tmp_path / "reports" / "fcn32s").exists()
    table = (tmp_path / "reports" / "scaling" / "fcn32s.md").read_text()
    assert table.count("\n| 1x") == 2 and "| 1x1 |" in out and "| 1x2 |" in out
    assert (tmp_path / "reports" / "figures" / "scaling-fcn32s.png").is_file()
    # MLflow: a parent run a configuration, a child a seed, and every training run's derived values.
    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.runName` = 'seeds-fcn32s'")
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    trained = client.search_runs([experiment.experiment_id], filter_string="params.`derived.global_batch` = '2'")
    assert len(trained) == 2
    assert {(r.data.params["train.scaling"], r.data.params["derived.momentum"], r.data.params["train.seed"])
            for r in trained} == {("sqrt", "0.8", "0"), ("sqrt", "0.8", "1")}


def test_argument_errors_are_one_line_and_status_2(tmp_path, capsys):
    code = cli.main(["scaling-study", "--stage", "fcn32s", "--seeds", "0", "1", "--configs", "2by1",
                     "--params", str(tmp_path / "none.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err) and "'2by1': expected WORKERSxIMAGES" in err
