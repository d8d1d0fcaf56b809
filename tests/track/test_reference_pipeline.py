"""The reference's released models in the pipeline: `fcn import`, then evaluate scores them beside
our stages with the published numbers for comparison, and register takes one as a baseline version.

The "released" FCN-8s is a caffemodel written here in the reference's layer graph at
width 1/16 with seeded weights (tests/support/caffe_writer.py); the real files cannot be
downloaded here. Scores are checked against an independent pass over the val images.
"""
import contextlib
import io
import json

import pytest
import torch
import yaml

from support import caffe_writer as cw  # noqa: E402

from fcn_models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pipelines import cli  # noqa: E402
from support.caffe_files import reference_weights
from support.evaluation import decoded_rows, direct_confusion, paper_scores, random_scorer
from support.training import WIDTH, write_shards

REFERENCE_WIDTH = 1 / 16


def fcn(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference-project")
    write_shards(root / "data" / "shards", n_train=1, n_val=5)
    net = cw.vgg16_fcn("fcn8s", REFERENCE_WIDTH)
    (root / "released").mkdir()
    caffemodel = cw.write_caffemodel(root / "released" / "fcn8s-mine.caffemodel",
                                     cw.model_layers(net, reference_weights(net, seed=3)))
    status, out, err = fcn("import", str(caffemodel), "--out", str(root / "models" / "reference" / "fcn8s"))
    assert status == 0, err
    # One trained stage of ours beside it.
    save_checkpoint(root / "models" / "fcn8s", random_scorer("fcn8s", seed=4, std=0.3, background_bias=1.0),
                    {"stage": "fcn8s"})
    (root / "params.yaml").write_text(yaml.safe_dump({"model": {"width": WIDTH}, "evaluate": {"timing_images": 2}}))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        status, out, err = fcn("evaluate", "--params", str(root / "params.yaml"), "--device", "cpu")
    assert status == 0, err
    return root, out


def test_evaluate_scores_an_imported_reference_beside_our_stages(project):
    root, out = project
    report = json.loads((root / "reports" / "evaluation.json").read_text())
    assert list(report) == ["fcn8s", "reference-fcn8s"]
    model, meta = load_checkpoint(root / "models" / "reference" / "fcn8s")
    model.eval()
    assert meta["input_norm"]["name"] == "caffe-bgr" and meta["imported_from"]["file"] == "fcn8s-mine.caffemodel"
    expected = paper_scores(direct_confusion(model, decoded_rows(root / "data" / "shards" / "val")))
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert report["reference-fcn8s"][key] == pytest.approx(expected[key], abs=1e-3), key
    assert report["reference-fcn8s"]["mlflow_run_id"] is None
    # The other reference names have no checkpoint: left out, nothing said of them as an error.
    assert "reference-fcn32s" not in report

    table = (root / "reports" / "evaluation.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| FCN")}
    assert f"{100 * report['reference-fcn8s']['mean_iu']:.1f}" in rows["FCN-8s (reference's weights)"]
    # The published numbers, for comparison: the paper's FCN-8s beside ours, the reference's
    # README and the converted weights' scores beside the reference model.
    assert "| 90.3 | 75.9 | 62.7 | 83.2 |" in rows["FCN-8s: the paper, Table 3"]
    assert "| 91.22 | 77.61 | 65.51 | 84.54 |" in rows[
        "FCN-8s (reference's weights): converted weights, as the Chainer port scores them"]
    assert "65.5" in rows["FCN-8s (reference's weights): the reference's README"]


def test_a_reference_registers_as_a_baseline_through_the_same_gate(project, monkeypatch):
    from mlflow import MlflowClient

    root, _ = project
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = str(root / "params.yaml")
    report = json.loads((root / "reports" / "evaluation.json").read_text())
    status, _, err = fcn("register", "--params", params, "--reference", "fcn8s")
    assert status == 0, err
    baseline = json.loads((root / "reports" / "registry.json").read_text())
    assert baseline["decision"] == "promoted" and baseline["stage"] == "reference-fcn8s"
    assert baseline["new_mean_iu"] == report["reference-fcn8s"]["mean_iu"]
    # Our FCN-8s goes through the same gate against it.
    status, _, err = fcn("register", "--params", params)
    assert status == 0, err
    ours = json.loads((root / "reports" / "registry.json").read_text())
    better = report["fcn8s"]["mean_iu"] > report["reference-fcn8s"]["mean_iu"]
    assert ours["decision"] == ("promoted" if better else "kept")
    assert ours["champion_version_before"] == baseline["new_version"]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version("fcn-voc", str(baseline["new_version"]))
    assert version.tags["stage"] == "reference-fcn8s"
    run = client.get_run(version.run_id)
    assert run.info.run_name == "register-reference-fcn8s"
    assert run.data.metrics["eval/mean_iu"] == pytest.approx(report["reference-fcn8s"]["mean_iu"])
    # A reference that was never imported is an error naming the directory and the fix.
    status, _, err = fcn("register", "--params", params, "--reference", "fcn16s")
    assert status == 1 and str(root / "models" / "reference" / "fcn16s") in err and "fcn import" in err
    assert torch.__version__  # the models ran on this torch
