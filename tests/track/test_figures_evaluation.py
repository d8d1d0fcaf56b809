"""The evaluate stage's pictures: the paper's Figure 4 and the learning curves, on disk and in MLflow.

One evaluate run over tiny real checkpoints that each predict one class everywhere
(FCN-32s class 3, FCN-16s class 5, FCN-8s class 7; no FCN-32s-fixed), 5 val images in two
shards whose ids are not in id order, histories for FCN-32s and FCN-8s only, and MLflow
runs for FCN-32s and FCN-8s in a SQLite store.
"""
import contextlib
import io

import numpy as np
import pytest
import yaml
from PIL import Image

from fcn_models.checkpoint import save_checkpoint
from fcn_models.palette import voc_colormap
from fcn_models.voc import VOID
from pipelines.core.params import parse_params
from pipelines.stages import evaluate
from pipelines.track import chain_figures, store
from pipelines.track.chain_figures import CELL, PAD, TITLE_BAND
from pipelines.track.val_scores import EvaluateError
from support.checkpoints import checkpoint_mask
from support.evaluation import constant_scorer
from support.shard_rows import sample_row, write_split
from support.training import WIDTH

FIGURE_IMAGES = 3
PREDICTED = {"fcn32s": 3, "fcn16s": 5, "fcn8s": 7}
# Shard order, not id order; each image's object class. The first three by id: a, b, c.
VAL = (("val_c", 4), ("val_e", 1), ("val_a", 1), ("val_d", 2), ("val_b", 2))
STAGES = {"fcn32s": {"init": "imagenet", "lr": 0.01, "iterations": 40},
          "fcn16s": {"init": "fcn32s", "lr": 0.01, "iterations": 30},
          "fcn8s": {"init": "fcn16s", "lr": 0.01, "iterations": 20}}
HISTORIES = {"fcn32s": [(10, 2.0, 0.10), (20, 1.5, 0.20), (30, 1.2, 0.25), (40, 1.0, 0.30)],
             "fcn8s": [(10, 0.9, 0.35), (20, 0.8, 0.40)]}


def val_rows():
    rows = []
    for i, (sample_id, cls) in enumerate(VAL):
        height, width = (24, 32) if i % 2 == 0 else (20, 28)
        label = np.zeros((height, width), np.uint8)
        label[4:4 + height // 2, 6:6 + width // 2] = cls
        label[0, :] = VOID
        image = np.full((height, width, 3), 90, np.uint8)
        image[label == cls] = (40, 200, 40)
        rows.append(sample_row(sample_id, image, label))
    return rows


def write_history(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["iteration,loss,pixel_acc,mean_acc,mean_iu,fw_iu"]
    lines += [f"{it},{loss},0.5,0.4,{iu},0.45" for it, loss, iu in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("figures")
    write_split(root / "shards" / "val", val_rows(), rows_per_file=2)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump({
        "data": {"shards_dir": "shards"},
        "model": {"width": WIDTH, "imagenet_weights": None},
        "train": {"models_dir": "models", "reports_dir": "reports", "stages": STAGES},
        "evaluate": {"stages": ["fcn32s-fixed", "fcn32s", "fcn16s", "fcn8s"], "timing_images": 1,
                     "figure_images": FIGURE_IMAGES},
    }))
    params = parse_params(yaml.safe_load(params_file.read_text()), root=root)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        client = MlflowClient(tracking_uri=store.tracking_uri(params))
        experiment = store.set_up(params)
        runs = {stage: client.create_run(experiment, run_name=stage).info.run_id for stage in ("fcn32s", "fcn8s")}
        for stage, cls in PREDICTED.items():
            meta = {"stage": stage, "iterations": STAGES[stage]["iterations"]}
            if stage in runs:
                meta["mlflow_run_id"] = runs[stage]
            save_checkpoint(root / "models" / stage, constant_scorer(stage, cls), meta)
        for stage, rows in HISTORIES.items():
            write_history(root / "reports" / stage / "history.csv", rows)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = evaluate.main(["--params", str(params_file), "--device", "cpu"])
    assert status == 0, err.getvalue()
    return root, params, client, runs, out.getvalue()


def colour(cls):
    return tuple(int(v) for v in voc_colormap()[cls])


def cell(picture, row, column):
    x, y = PAD + column * (CELL + PAD), TITLE_BAND + row * (CELL + PAD)
    return picture[y:y + CELL, x:x + CELL]


def test_figure4_is_a_row_per_image_and_a_column_per_stage_in_the_papers_order(evaluated):
    root, params, _, _, out = evaluated
    picture = np.asarray(Image.open(root / "reports" / "figures" / "figure4.png").convert("RGB"))
    # 3 rows; image, truth, FCN-32s, FCN-16s, FCN-8s (FCN-32s-fixed has no checkpoint).
    assert picture.shape[:2] == (TITLE_BAND + 3 * (CELL + PAD), PAD + 5 * (CELL + PAD)) == (646, 1036)
    assert "figure 4: val images val_a, val_b, val_c" in out
    white = np.array([255, 255, 255])
    ids = sorted(sample_id for sample_id, _ in VAL)[:FIGURE_IMAGES]
    classes = dict(VAL)
    for row, sample_id in enumerate(ids):
        # Each prediction cell is the colour of what that column's checkpoint predicts.
        for column, stage in enumerate(PREDICTED, start=2):
            image = np.full((24, 32, 3), 90, np.uint8)
            mask = checkpoint_mask(root / "models" / stage, image)
            assert np.unique(mask).tolist() == [PREDICTED[stage]]
            centre = tuple(int(v) for v in cell(picture, row, column)[CELL // 2, CELL // 2])
            assert centre == colour(PREDICTED[stage]), (sample_id, stage)
        # The truth: background, void (its own colour, the top row) and this image's class only.
        truth = cell(picture, row, 1).reshape(-1, 3)
        shown = {tuple(int(v) for v in c) for c in np.unique(truth, axis=0)} - {(255, 255, 255)}
        assert shown == {colour(0), colour(VOID), colour(classes[sample_id])}, sample_id
        # The image itself: its grey and green, not a class map.
        assert tuple(cell(picture, row, 0)[CELL // 2, CELL // 2]) != tuple(white)
        assert colour(0) not in {tuple(int(v) for v in c) for c in cell(picture, row, 0).reshape(-1, 3)}
    # A title over every column, in the band above the first row.
    for column in range(5):
        band = picture[:TITLE_BAND, PAD + column * (CELL + PAD):PAD + column * (CELL + PAD) + CELL]
        assert band.min() < 128, column


def test_learning_curves_drawn_from_two_histories_the_missing_one_skipped_with_a_line(evaluated):
    root, params, _, _, out = evaluated
    picture = np.asarray(Image.open(root / "reports" / "figures" / "learning_curves.png").convert("RGB"))
    assert picture.shape[:2] == (700, 900)
    colours = {tuple(int(v) for v in c) for c in np.unique(picture.reshape(-1, 3), axis=0)}
    # One colour a stage, by its place in evaluate.stages: FCN-32s C1, FCN-16s C2, FCN-8s C3.
    assert (255, 127, 14) in colours and (214, 39, 40) in colours
    assert (44, 160, 44) not in colours
    assert f"fcn16s: no history at {root / 'reports' / 'fcn16s' / 'history.csv'}, left out" in out
    assert "fcn32s-fixed: no history at" in out


def test_a_stage_starts_where_the_stage_it_starts_from_ended():
    params = parse_params({"train": {"stages": STAGES}}, "test params")
    histories = {"fcn32s": [{"iteration": 10.0}, {"iteration": 40.0}]}
    assert chain_figures.chain_start("fcn32s", params, histories) == 0
    assert chain_figures.chain_start("fcn16s", params, histories) == 40
    # FCN-16s has no history: its configured 30 iterations stand for it.
    assert chain_figures.chain_start("fcn8s", params, histories) == 70
    assert chain_figures.chain_start("fcn8s", params, {**histories, "fcn16s": [{"iteration": 25.0}]}) == 65


def test_a_broken_history_is_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("iteration,loss,mean_iu\n10,1.0,0.2\n20,oops,0.3\n")
    with pytest.raises(EvaluateError, match=rf"{path}: line 3 is not numbers"):
        chain_figures.read_history(path)
    path.write_text("iteration,mean_iu\n10,0.2\n")
    with pytest.raises(EvaluateError, match=rf"{path}: no column loss"):
        chain_figures.read_history(path)


def test_both_figures_are_artifacts_of_the_final_stages_run(evaluated, tmp_path):
    root, _, client, runs, _ = evaluated
    assert {a.path for a in client.list_artifacts(runs["fcn8s"], "figures")} == \
        {"figures/figure4.png", "figures/learning_curves.png"}
    assert client.list_artifacts(runs["fcn32s"], "figures") == []
    local = client.download_artifacts(runs["fcn8s"], "figures", str(tmp_path))
    for name in ("figure4.png", "learning_curves.png"):
        assert (tmp_path / "figures" / name).read_bytes() == (root / "reports" / "figures" / name).read_bytes()
    assert local == str(tmp_path / "figures")
