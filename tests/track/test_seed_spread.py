"""The spread over seeds: its numbers, its file, its rows in the tables, and its MLflow runs
(the real SQLite store in a temp project). Nothing trains here: the scores are written by hand."""
import json
import math

import pytest

from fcn_models.errors import FCNError
from fcn_models.metrics import SCORE_KEYS
from pipelines.core.errors import UsageError
from pipelines.core.params import parse_params
from pipelines.stages import evaluate
from pipelines.track import seed_runs, seed_spread, stage_runs, store
from pipelines.track.val_scores import format_table
from pipelines.train import recipe

# Three seeds' scores: mean IU 0.60, 0.62, 0.64 has mean 0.62 and sample std 0.02 (the
# population std would be 0.0163); pixel accuracy is the same for all three.
SCORES = [
    {"pixel_acc": 0.90, "mean_acc": 0.70, "mean_iu": 0.60, "fw_iu": 0.80},
    {"pixel_acc": 0.90, "mean_acc": 0.74, "mean_iu": 0.62, "fw_iu": 0.83},
    {"pixel_acc": 0.90, "mean_acc": 0.72, "mean_iu": 0.64, "fw_iu": 0.86},
]


def per_seed(training_runs=(None, None, None)):
    return [{"seed": seed, **scores, "checkpoint": f"models/seeds/seed-{seed}/fcn8s", "training_run": run}
            for seed, scores, run in zip((0, 1, 2), SCORES, training_runs)]


def project_params(root):
    return parse_params({"train": {"stages": {
        "fcn16s": {"init": "imagenet", "lr": 1e-3, "iterations": 4},
        "fcn8s": {"init": "fcn16s", "lr": 1e-3, "iterations": 4}}}}, "test params", root=root)


def report_of(params, stage="fcn8s", source="training", runs=(None, None, None), parent=None):
    return seed_spread.spread_report(stage, source, per_seed(runs),
                                     seed_spread.result_params(recipe.stage_params(params, stage)), parent)


# --------------------------------------------------------------------------- the numbers


def test_the_spread_is_the_mean_and_the_sample_standard_deviation():
    spread = seed_spread.spread(per_seed())
    assert spread["mean_iu"]["mean"] == pytest.approx(0.62, abs=1e-12)
    assert spread["mean_iu"]["std"] == pytest.approx(0.02, abs=1e-12)
    assert spread["mean_acc"] == pytest.approx({"mean": 0.72, "std": 0.02}, abs=1e-12)
    assert spread["fw_iu"] == pytest.approx({"mean": 0.83, "std": 0.03}, abs=1e-12)
    assert spread["pixel_acc"] == pytest.approx({"mean": 0.90, "std": 0.0}, abs=1e-12)
    # Two seeds: std = |a - b| / sqrt(2).
    two = seed_spread.spread(per_seed()[:2])
    assert two["mean_iu"]["std"] == pytest.approx(0.02 / math.sqrt(2), abs=1e-12)


def test_a_null_score_of_one_seed_makes_that_scores_spread_null():
    seeds = per_seed()
    seeds[1]["mean_acc"] = None
    spread = seed_spread.spread(seeds)
    assert spread["mean_acc"] == {"mean": None, "std": None}
    assert spread["mean_iu"]["mean"] == pytest.approx(0.62)
    with pytest.raises(ValueError, match="two seeds or more"):
        seed_spread.spread(seeds[:1])


@pytest.mark.parametrize("seeds, message", [
    ([3], "at least two seeds"),
    ([0, 1, 0], "0 named twice"),
    ([-1, 2], "-1 is not a seed"),
    ([0, 2**32], f"{2**32} is not a seed"),
])
def test_seeds_that_cannot_make_a_spread_are_usage_errors(seeds, message):
    with pytest.raises(UsageError, match=message):
        seed_spread.check_seeds(seeds)
    assert seed_spread.check_seeds([2, 0, 7]) == [2, 0, 7]


def test_each_seed_has_directories_beside_the_pipelines(tmp_path):
    params = project_params(tmp_path)
    assert seed_spread.seed_models_dir(params, 3) == tmp_path / "models" / "seeds" / "seed-3"
    assert seed_spread.seed_reports_dir(params, 3) == tmp_path / "reports" / "seeds" / "seed-3"
    assert seed_spread.spread_file(params, "fcn8s") == tmp_path / "reports" / "seeds" / "fcn8s.json"


# --------------------------------------------------------------------------- the file and the tables


def test_the_spread_file_round_trips_and_a_broken_one_names_itself(tmp_path):
    params = project_params(tmp_path)
    path = seed_spread.spread_file(params, "fcn8s")
    assert seed_spread.read_spread(path, "fcn8s") is None
    doc = report_of(params, parent="abc")
    seed_spread.write_spread(path, doc)
    assert [p.name for p in path.parent.iterdir()] == ["fcn8s.json"]  # no temp file left
    read = seed_spread.read_spread(path, "fcn8s")
    assert read == json.loads(json.dumps(doc))
    assert (read["seeds"], read["k"], read["source"], read["mlflow_run_id"]) == ([0, 1, 2], 3, "training", "abc")
    assert read["scores"]["mean_iu"]["std"] == pytest.approx(0.02)
    assert "train.seed" not in read["params"] and read["params"]["stage.init"] == "fcn16s"

    # A NaN is refused before the file is touched: the old one stays.
    bad = {**doc, "scores": {**doc["scores"], "mean_iu": {"mean": float("nan"), "std": 0.0}}}
    with pytest.raises(ValueError):
        seed_spread.write_spread(path, bad)
    assert seed_spread.read_spread(path, "fcn8s")["scores"]["mean_iu"]["mean"] == pytest.approx(0.62)

    for text, why in (("{not json", "not a readable spread file"),
                      (json.dumps({**doc, "stage": "fcn16s"}), "not the spread of stage fcn8s"),
                      (json.dumps({**doc, "seeds": [0]}), "'seeds' must list"),
                      (json.dumps({**doc, "scores": {"mean_iu": {"mean": 0.6, "std": 0.1}}}), "no mean and std of")):
        path.write_text(text)
        with pytest.raises(seed_spread.SpreadError) as caught:
            seed_spread.read_spread(path, "fcn8s")
        assert str(path) in str(caught.value) and why in str(caught.value)
        assert "fcn seeds --stage fcn8s" in str(caught.value)
        assert isinstance(caught.value, FCNError)


def test_the_terminal_table_shows_each_seed_then_mean_plus_minus_std(tmp_path):
    lines = seed_spread.spread_lines(report_of(project_params(tmp_path)))
    assert lines[0].split() == ["seed", "pixel", "acc.", "mean", "acc.", "mean", "IU", "f.w.", "IU"]
    assert lines[1].split() == ["0", "90.00", "70.00", "60.00", "80.00"]
    assert lines[3].split() == ["2", "90.00", "72.00", "64.00", "86.00"]
    assert lines[4].split() == ["mean", "±", "std", "90.00", "±", "0.00", "72.00", "±", "2.00",
                                "62.00", "±", "2.00", "83.00", "±", "3.00"]
    # The columns line up under their headings.
    assert lines[0].index("mean IU") == lines[1].index("60.00") == lines[4].index("62.00 ±")


def test_the_evaluation_table_shows_a_row_of_mean_plus_minus_std_under_the_stage(tmp_path):
    params = project_params(tmp_path)
    seed_spread.write_spread(seed_spread.spread_file(params, "fcn8s"), report_of(params, source="evaluate"))
    report = {stage: {**SCORES[0], "forward_ms": 5.0} for stage in ("fcn16s", "fcn8s")}
    text = format_table(report, 10, 3, "a test machine", None, evaluate.seed_spreads(params, report))
    lines = text.splitlines()
    row = lines.index("| FCN-8s | 90.0 | 70.0 | 60.0 | 80.0 | 5.0 |")
    assert lines[row + 1] == ("| FCN-8s, 3 seeds (0, 1, 2), mean ± std, scored as above | 90.0 ± 0.0 | 72.0 ± 2.0 "
                              "| 62.0 ± 2.0 | 83.0 ± 3.0 | |")
    # FCN-16s has no spread file: no row, and the note comes once.
    assert sum("seeds (" in line for line in lines) == 1
    assert text.count("sample standard deviation") == 1
    # Without spreads the table is as it was.
    assert "seeds" not in format_table(report, 10, 3, "a test machine")


def test_a_spread_made_with_other_params_is_left_out_of_the_table_with_a_line(tmp_path, capsys):
    params = project_params(tmp_path)
    seed_spread.write_spread(seed_spread.spread_file(params, "fcn8s"), report_of(params))
    # Another seed for the pipeline changes nothing: the seed is what the spread varies.
    reseeded = parse_params({"train": {"seed": 5, "stages": {
        "fcn16s": {"init": "imagenet", "lr": 1e-3, "iterations": 4},
        "fcn8s": {"init": "fcn16s", "lr": 1e-3, "iterations": 4}}}}, "test params", root=tmp_path)
    assert set(evaluate.seed_spreads(reseeded, ["fcn8s"])) == {"fcn8s"}
    retuned = parse_params({"train": {"stages": {
        "fcn16s": {"init": "imagenet", "lr": 1e-3, "iterations": 4},
        "fcn8s": {"init": "fcn16s", "lr": 2e-3, "iterations": 4}}}}, "test params", root=tmp_path)
    assert evaluate.seed_spreads(retuned, ["fcn8s"]) == {}
    assert "stage.lr 0.001 -> 0.002" in capsys.readouterr().out
    # A broken file: a warning, no row, and evaluate goes on.
    seed_spread.spread_file(params, "fcn8s").write_text("[]")
    assert evaluate.seed_spreads(params, ["fcn8s"]) == {}
    assert "not the spread of stage fcn8s" in capsys.readouterr().err


# --------------------------------------------------------------------------- MLflow


def test_a_parent_run_holds_the_spread_and_a_child_per_seed_names_its_training_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = project_params(tmp_path)
    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    experiment_id = store.set_up(params)
    # The seeds' training runs, nested under the run that trained their starting weights, as stages are.
    upstream = client.create_run(experiment_id, run_name="fcn16s-x", tags={stage_runs.STAGE_TAG: "fcn16s"})
    training = [client.create_run(experiment_id, run_name=f"fcn8s-{seed}", tags={
        stage_runs.STAGE_TAG: "fcn8s", stage_runs.PARENT_RUN_TAG: upstream.info.run_id}).info.run_id
        for seed in (0, 1, 2)]

    seeds_run = seed_runs.open_seeds_run(params, "fcn8s", [0, 1, 2], "training")
    assert client.get_run(seeds_run.run_id).info.status == "RUNNING"
    children = [seed_runs.log_seed(seeds_run, "fcn8s", entry) for entry in per_seed(training)]
    doc = report_of(params, runs=training, parent=seeds_run.run_id)
    path = seed_spread.spread_file(params, "fcn8s")
    seed_spread.write_spread(path, doc)
    seed_runs.finish_seeds_run(seeds_run, doc, path)

    parent = client.get_run(seeds_run.run_id)
    assert parent.info.experiment_id == experiment_id and parent.info.run_name == "seeds-fcn8s"
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {"stage": "fcn8s", "seeds": "0,1,2", "k": "3", "scores_from": "training"}
    assert parent.data.metrics["mean_iu_mean"] == pytest.approx(0.62)
    assert parent.data.metrics["mean_iu_std"] == pytest.approx(0.02)
    assert parent.data.metrics["fw_iu_std"] == pytest.approx(0.03)
    assert parent.data.metrics["pixel_acc_std"] == pytest.approx(0.0, abs=1e-12)
    assert len(parent.data.metrics) == 2 * len(SCORE_KEYS)
    assert [a.path for a in client.list_artifacts(seeds_run.run_id)] == ["fcn8s.json"]

    found = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{seeds_run.run_id}'")
    assert sorted(r.info.run_id for r in found) == sorted(children)
    for seed, child_id, training_run, scores in zip((0, 1, 2), children, training, SCORES):
        child = client.get_run(child_id)
        assert client.get_parent_run(child_id).info.run_id == seeds_run.run_id
        assert child.info.status == "FINISHED" and child.info.run_name == f"fcn8s-seed-{seed}"
        assert child.data.params == {"seed": str(seed)}
        assert child.data.tags[seed_runs.TRAINING_RUN_TAG] == training_run
        assert training_run in child.data.tags[stage_runs.NOTE_TAG]
        assert child.data.metrics == pytest.approx(scores)
        # The training run keeps its place in the lineage.
        assert client.get_parent_run(training_run).info.run_id == upstream.info.run_id
    # `fcn status` lists training runs only.
    listed = {r.info.run_id for r in stage_runs.stage_runs(params)}
    assert listed == {upstream.info.run_id, *training}


def test_a_failed_spread_ends_its_parent_run_failed(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = project_params(tmp_path)
    seeds_run = seed_runs.open_seeds_run(params, "fcn8s", [0, 1], "evaluate")
    seed_runs.end_seeds_run(seeds_run, "KILLED")
    run = MlflowClient(tracking_uri=store.tracking_uri(params)).get_run(seeds_run.run_id)
    assert run.info.status == "KILLED" and run.data.params["scores_from"] == "evaluate"


def test_a_store_that_cannot_be_opened_is_a_tracking_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "not-a-dir").write_text("a file where the store's directory must be")
    params = parse_params({"mlflow": {"db_file": "not-a-dir/mlflow.db"}}, root=tmp_path)
    with pytest.raises(store.TrackingError, match="not-a-dir/mlflow.db"):
        seed_runs.open_seeds_run(params, "fcn8s", [0, 1], "training")
