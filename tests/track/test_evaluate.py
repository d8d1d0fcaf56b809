"""The evaluate stage: each stage's checkpoint on all of val, whole images, batch 1.

Tiny width-0.0625 networks with score layers drawn at random (they start at zero,
which predicts background everywhere) score 7 generated val images; the test scores
the same images itself (PIL decoding, the model called directly, its own confusion
matrix and the paper's formulas) and the stage's JSON and table must agree with it.
"""
import contextlib
import io
import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from fcn_models.checkpoint import save_checkpoint
from fcn_models.metrics import ConfusionMatrix, stride_ceiling
from fcn_models.summary import cpu_model
from fcn_models.voc import class_names
from pipelines import cli
from pipelines.core.files import file_sha256
from pipelines.core.params import parse_params
from pipelines.stages import evaluate
from pipelines.track import store, val_scores
from fcn_models.voc import VOID
from support.evaluation import decoded_rows, direct_confusion, paper_scores, random_scorer
from support.training import WIDTH, write_shards

N_VAL = 7
TIMING_IMAGES = 3










def write_params(path, root, shards_dir, models_dir, stages=("fcn32s-fixed", "fcn32s", "fcn16s", "fcn8s")):
    path.write_text(yaml.safe_dump({
        "data": {"shards_dir": str(shards_dir)},
        "model": {"width": WIDTH, "imagenet_weights": None},
        "train": {"models_dir": str(models_dir)},
        "evaluate": {"stages": list(stages), "timing_images": TIMING_IMAGES,
                     "report_file": str(root / "reports" / "evaluation.json"),
                     "table_file": str(root / "reports" / "evaluation.md")},
    }))
    return path


def evaluate_cli(params_file):
    """evaluate.main on CPU: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = evaluate.main(["--params", str(params_file), "--device", "cpu"])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Checkpoints for fcn32s-fixed, fcn32s and fcn8s (fcn16s missing), scored by the stage."""
    root = tmp_path_factory.mktemp("evaluate")
    write_shards(root / "shards", n_train=1, n_val=N_VAL)
    # On images this small FCN-32s sees about one stride-32 cell: one class per net.
    models = {"fcn32s-fixed": random_scorer("fcn32s", seed=1, std=1.0, background_bias=0.0),
              "fcn32s": random_scorer("fcn32s", seed=2, std=3.0, background_bias=2.0),
              "fcn8s": random_scorer("fcn8s", seed=4, std=0.3, background_bias=1.0)}
    for stage, model in models.items():
        save_checkpoint(root / "models" / stage, model, {"stage": stage})
    params_file = write_params(root / "params.yaml", root, root / "shards", root / "models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(val_scores, "PROGRESS_EVERY", 5)  # 7 images: one progress line per stage
        status, out, err = evaluate_cli(params_file)
    assert status == 0, err
    val_rows = decoded_rows(root / "shards" / "val")
    matrices = {stage: direct_confusion(model, val_rows) for stage, model in models.items()}
    return root, matrices, val_rows, out


def test_scores_equal_an_independent_pass_over_every_val_image(evaluated):
    root, matrices, val_rows, _ = evaluated
    report = json.loads((root / "reports" / "evaluation.json").read_text())
    assert list(report) == ["fcn32s-fixed", "fcn32s", "fcn8s"]
    void_free = sum(int((label != VOID).sum()) for _, _, label in val_rows)
    # Truth has 3 classes; FCN-8s predicts several, some right: the comparison means something.
    assert (matrices["fcn8s"].sum(0) > 0).sum() >= 3 and np.trace(matrices["fcn8s"]) > 0
    assert len({paper_scores(m)["mean_iu"] for m in matrices.values()}) == 3
    for stage, matrix in matrices.items():
        assert matrix.sum() == void_free
        expected, entry = paper_scores(matrix), report[stage]
        for key in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
            assert entry[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), (stage, key)
        assert list(entry["per_class_iu"]) == class_names()
        for name, iu in zip(class_names(), expected["per_class_iu"]):
            if math.isnan(iu):
                assert entry["per_class_iu"][name] is None, (stage, name)
            else:
                assert entry["per_class_iu"][name] == pytest.approx(iu, rel=1e-12, abs=1e-15), (stage, name)
        assert entry["images"] == N_VAL
        assert entry["timed_images"] == TIMING_IMAGES
        assert entry["forward_ms"] > 0 and entry["forward_ms_median"] > 0
        assert entry["device"] == "cpu"
    # Classes 3..20 are in no label, and some are predicted nowhere: undefined IU, null in the JSON.
    assert any(v is None for entry in report.values() for v in entry["per_class_iu"].values())


def test_table_rows_in_the_papers_order_in_percent(evaluated):
    root, matrices, _, _ = evaluated
    table = (root / "reports" / "evaluation.md").read_text()
    ours, published = table.split("## Published")
    rows = [line for line in ours.splitlines() if line.startswith("| FCN")]
    header = next(line for line in table.splitlines() if line.startswith("| |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "", "pixel acc.", "mean acc.", "mean IU", "f.w. IU", "forward time (ms)"]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[0] for c in cells] == ["FCN-32s-fixed", "FCN-32s", "FCN-8s"]
    for stage, row in zip(matrices, cells):
        expected = paper_scores(matrices[stage])
        assert row[1:5] == [f"{100 * expected[k]:.1f}" for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")]
        assert re.fullmatch(r"\d+\.\d", row[5]) and float(row[5]) > 0
    assert f"all {N_VAL} val images" in table
    assert f"mean over {TIMING_IMAGES} val images after one warm-up image" in table
    assert cpu_model() in table
    # The paper's numbers beside ours, as a reminder of what the full run aims for.
    assert [line.split("|")[1].strip() for line in published.splitlines() if line.startswith("| FCN")] == [
        "FCN-32s-fixed: the paper, Table 3", "FCN-32s: the paper, Table 3", "FCN-8s: the paper, Table 3"]
    assert "| 89.1 | 73.3 | 59.4 | 81.4 |" in published


def test_the_table_shows_what_each_output_stride_allows_on_the_same_images(evaluated):
    root, _, val_rows, _ = evaluated
    ceilings_part = (root / "reports" / "evaluation.md").read_text().split("## What an output stride allows")[1]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")][1:]
            for line in ceilings_part.split("## Published")[0].splitlines() if line.startswith("| labels")}
    assert list(rows) == [f"labels at stride {s}, back to full size" for s in (32, 16, 8)]
    for stride, cells in zip((32, 16, 8), rows.values()):
        matrix = ConfusionMatrix(21)
        for _, _, label in val_rows:
            truth = torch.from_numpy(label)
            matrix.update(stride_ceiling(truth, stride), truth)
        expected = matrix.scores()
        assert cells == [f"{100 * expected[k]:.1f}" for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")]
    mean_ius = [float(cells[2]) for cells in rows.values()]
    assert mean_ius[0] <= mean_ius[1] <= mean_ius[2] <= 100.0


def test_missing_stage_skipped_with_a_line_and_progress_reported(evaluated):
    root, _, _, out = evaluated
    assert f"fcn16s: no checkpoint at {root / 'models' / 'fcn16s'}, skipped" in out
    assert "[fcn8s] 5/7 images" in out
    # Written by rename: nothing temporary left beside the files. No stage has a history: no curves.
    assert sorted(p.name for p in (root / "reports").iterdir()) == ["evaluation.json", "evaluation.md", "figures"]
    assert [p.name for p in (root / "reports" / "figures").iterdir()] == ["figure4.png"]
    assert "no stage has a history: no learning curves" in out


def test_no_checkpoint_at_all_is_an_error_naming_the_directory_and_command(tmp_path):
    write_shards(tmp_path / "shards", n_train=1, n_val=2)
    params_file = write_params(tmp_path / "params.yaml", tmp_path, tmp_path / "shards", tmp_path / "models")
    status, out, err = evaluate_cli(params_file)
    assert status == 1
    assert str(tmp_path / "models") in err and "fcn train --stage fcn32s" in err
    assert not (tmp_path / "reports").exists()
    # The same through the `fcn` command.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as cli_err:
        assert cli.main(["evaluate", "--params", str(params_file), "--device", "cpu"]) == 1
    assert "no checkpoint for any of evaluate.stages" in cli_err.getvalue()


def rewrite_val(shards_dir, change):
    """Copy of the generated val shard with change(rows) applied, as part-00000.parquet."""
    path = shards_dir / "val" / "part-00000.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return path


def bad_shard_setup(tmp_path, evaluated):
    root = evaluated[0]
    write_shards(tmp_path / "shards", n_train=1, n_val=3)
    params_file = write_params(tmp_path / "params.yaml", tmp_path, tmp_path / "shards", root / "models",
                               stages=["fcn32s"])
    # A report from an earlier run must survive a failed one untouched.
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "evaluation.json").write_text('{"earlier": 1}\n')
    return params_file


def test_bad_shards_are_errors_naming_the_file(tmp_path, evaluated):
    params_file = bad_shard_setup(tmp_path, evaluated)
    garbage = tmp_path / "shards" / "val" / "part-00001.parquet"
    garbage.write_bytes(b"not parquet at all")
    status, _, err = evaluate_cli(params_file)
    assert status == 1 and str(garbage) in err and "not a readable Parquet shard" in err
    garbage.unlink()

    def corrupt_image(rows):
        rows[1]["image"] = b"\xff\xd8 truncated"
    path = rewrite_val(tmp_path / "shards", corrupt_image)
    status, _, err = evaluate_cli(params_file)
    assert status == 1 and str(path) in err and "val_000001" in err and "JPEG" in err

    write_shards(tmp_path / "other", n_train=1, n_val=3)
    (tmp_path / "shards" / "val" / "part-00000.parquet").write_bytes(
        (tmp_path / "other" / "val" / "part-00000.parquet").read_bytes())

    def label_out_of_range(rows):
        label = np.asarray(Image.open(io.BytesIO(rows[2]["label"]))).copy()
        label[5, 5] = 30
        png = io.BytesIO()
        Image.fromarray(label, "L").save(png, "PNG")
        rows[2]["label"] = png.getvalue()
    rewrite_val(tmp_path / "shards", label_out_of_range)
    status, _, err = evaluate_cli(params_file)
    assert status == 1 and str(path) in err and "val_000002" in err and "label 30" in err

    pq.write_table(pq.read_table(path).drop_columns(["label"]), path)
    status, _, err = evaluate_cli(params_file)
    assert status == 1 and str(path) in err and "lacks column label" in err

    assert (tmp_path / "reports" / "evaluation.json").read_text() == '{"earlier": 1}\n'
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["evaluation.json"]


def test_missing_val_shards_and_incomplete_checkpoint(tmp_path, evaluated):
    params_file = write_params(tmp_path / "params.yaml", tmp_path, tmp_path / "shards", evaluated[0] / "models")
    status, _, err = evaluate_cli(params_file)
    assert status == 1 and str(tmp_path / "shards" / "val") in err and "fcn preprocess" in err

    write_shards(tmp_path / "shards", n_train=1, n_val=2)
    (tmp_path / "models" / "fcn32s").mkdir(parents=True)
    (tmp_path / "models" / "fcn32s" / "meta.json").write_text("{}")
    params_file = write_params(tmp_path / "params.yaml", tmp_path, tmp_path / "shards", tmp_path / "models")
    status, _, err = evaluate_cli(params_file)
    assert status == 1 and str(tmp_path / "models" / "fcn32s") in err and "model.pt is missing" in err


def test_scores_go_to_the_run_that_trained_the_checkpoint(tmp_path, monkeypatch):
    """The checkpoint names its MLflow run (training writes it into meta.json): evaluate logs
    the full-resolution scores there, and records which weights and run the scores belong to."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_shards(tmp_path / "shards", n_train=1, n_val=3)
    params_file = write_params(tmp_path / "params.yaml", tmp_path, tmp_path / "shards", tmp_path / "models",
                               stages=["fcn32s", "fcn8s"])
    params = parse_params(yaml.safe_load(params_file.read_text()), root=tmp_path)
    client = MlflowClient(tracking_uri=store.tracking_uri(params))
    run = client.create_run(store.set_up(params), run_name="fcn32s-trained")
    save_checkpoint(tmp_path / "models" / "fcn32s", random_scorer("fcn32s", 2, 3.0, 2.0),
                    {"stage": "fcn32s", "mlflow_run_id": run.info.run_id, "iterations": 7})
    # A run id from another store: the scores stay in the report, with a line saying so.
    save_checkpoint(tmp_path / "models" / "fcn8s", random_scorer("fcn8s", 4, 0.3, 1.0),
                    {"stage": "fcn8s", "mlflow_run_id": "f" * 32})
    status, out, err = evaluate_cli(params_file)
    assert status == 0, err
    report = json.loads((tmp_path / "reports" / "evaluation.json").read_text())
    assert report["fcn32s"]["mlflow_run_id"] == run.info.run_id
    assert report["fcn32s"]["weights_sha256"] == file_sha256(tmp_path / "models" / "fcn32s" / "model.pt")
    logged = client.get_run(run.info.run_id).data.metrics
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert logged[f"eval/{key}"] == pytest.approx(report["fcn32s"][key], rel=1e-12)
    for name, iu in report["fcn32s"]["per_class_iu"].items():
        assert (f"eval/iu/{name}" in logged) == (iu is not None)
    # At the checkpoint's iteration: on the run's curves where those weights were taken.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/mean_iu")] == [7]
    assert f"MLflow run {'f' * 32} is not in" in out
