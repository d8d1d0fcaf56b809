import math

import numpy as np
import pytest
import torch

from fcn_models.metrics import ConfusionMatrix, scores_from_matrix

# A 3-class case worked out by hand. Pixels (truth, prediction), 255 ignored:
# (0,0) (0,1) (1,1) | (1,1) (1,1) ignored | (2,2) (2,0) (2,2)
TRUTH = [[0, 0, 1], [1, 1, 255], [2, 2, 2]]
PRED = [[0, 1, 1], [1, 1, 0], [2, 0, 2]]


def test_matrix_counts_truth_rows_prediction_columns_and_skips_ignore():
    cm = ConfusionMatrix(3).update(torch.tensor(PRED), torch.tensor(TRUTH))
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 2]]
    assert cm.total == 8


def test_scores_match_hand_computation():
    s = ConfusionMatrix(3).update(np.array(PRED), np.array(TRUTH)).scores()
    assert s["pixel_acc"] == pytest.approx(6 / 8)
    assert s["mean_acc"] == pytest.approx((1 / 2 + 3 / 3 + 2 / 3) / 3)
    assert s["per_class_iu"] == pytest.approx([1 / 3, 3 / 4, 2 / 3])
    assert s["mean_iu"] == pytest.approx((1 / 3 + 3 / 4 + 2 / 3) / 3)
    assert s["fw_iu"] == pytest.approx(2 / 8 * 1 / 3 + 3 / 8 * 3 / 4 + 3 / 8 * 2 / 3)


def test_absent_class_is_nan_and_left_out_of_the_means():
    # Class 3 appears in neither truth nor prediction; class 2 only in prediction.
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    s = ConfusionMatrix(4).update(pred, truth).scores()
    iu = s["per_class_iu"]
    assert math.isnan(iu[3])
    assert iu[2] == 0.0  # predicted but never true: a real zero, not "absent"
    assert iu[0] == pytest.approx(1 / 2) and iu[1] == pytest.approx(1.0)
    assert s["mean_iu"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert s["mean_acc"] == pytest.approx((0.5 + 1.0) / 2)  # class 2 has no true pixels
    assert s["fw_iu"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    assert not any(math.isnan(s[k]) for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"))


def test_empty_matrix_scores_are_nan_not_errors():
    s = scores_from_matrix(np.zeros((3, 3)))
    assert all(math.isnan(s[k]) for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"))


def test_workers_merge_by_addition():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 21, size=(4, 50, 60))
    truth[:, :3] = 255
    pred = rng.integers(0, 21, size=truth.shape)
    whole = ConfusionMatrix(21)
    for t, p in zip(truth, pred):
        whole.update(p, t)
    worker_a = ConfusionMatrix(21).update(pred[:2], truth[:2])
    worker_b = ConfusionMatrix(21).update(pred[2:], truth[2:])
    merged = worker_a + worker_b
    assert np.array_equal(merged.matrix, whole.matrix)
    assert merged.total == 4 * 47 * 60
    assert merged.scores()["mean_iu"] == pytest.approx(whole.scores()["mean_iu"])
    # __add__ leaves its operands alone
    assert worker_a.total == 2 * 47 * 60


def test_perfect_prediction_scores_one():
    truth = torch.randint(0, 5, (2, 16, 16))
    s = ConfusionMatrix(5).update(truth, truth).scores()
    assert s["pixel_acc"] == s["mean_acc"] == s["mean_iu"] == s["fw_iu"] == pytest.approx(1.0)


def test_bad_labels_are_errors():
    with pytest.raises(ValueError, match="label 42"):
        ConfusionMatrix(21).update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 42, 255]))
    with pytest.raises(ValueError, match="prediction holds label 21"):
        ConfusionMatrix(21).update(torch.tensor([0, 21]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pixels"):
        ConfusionMatrix(21).update(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="merge"):
        ConfusionMatrix(21).merge(ConfusionMatrix(3))
