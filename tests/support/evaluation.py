"""Test helpers shared across parts: evaluation."""
import io

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from fcn_models.fcn import build_fcn
from fcn_models.preprocess import normalize
from fcn_models.voc import VOID
from support.training import WIDTH


def decoded_rows(shard_dir):
    """(id, RGB image, label) of every row, decoded with PIL (not the stage's OpenCV)."""
    rows = []
    for row in pq.read_table(shard_dir).to_pylist():
        image = np.array(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        label = np.array(Image.open(io.BytesIO(row["label"])))
        rows.append((row["id"], image, label))
    return rows


def random_scorer(variant, seed, std, background_bias):
    """A tiny FCN whose score layers are drawn from N(0, std), background favoured by a bias.
    (A few training steps from a random trunk still predict background everywhere.)"""
    torch.manual_seed(seed)
    model = build_fcn(variant, width=WIDTH)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("score"):
                param.normal_(0, std)
        model.score_fr.bias[0] += background_bias
    return model.eval()


def direct_confusion(model, val_rows, n=21):
    matrix = np.zeros((n, n), np.int64)
    with torch.no_grad():
        for _, image, label in val_rows:
            prediction = model(normalize(image, model.input_norm)[None]).argmax(1)[0].numpy()
            keep = label != VOID
            matrix += np.bincount(label[keep].astype(np.int64) * n + prediction[keep], minlength=n * n).reshape(n, n)
    return matrix


def paper_scores(m):
    """The design's formulas, written out: rows truth, columns prediction."""
    m = m.astype(np.float64)
    diag, rows, cols, total = np.diag(m), m.sum(1), m.sum(0), m.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iu = diag / (rows + cols - diag)
        freq = rows / total
        return {"pixel_acc": diag.sum() / total, "mean_acc": np.nanmean(diag / rows), "mean_iu": np.nanmean(iu),
                "fw_iu": (freq[freq > 0] * iu[freq > 0]).sum(), "per_class_iu": iu}


def constant_scorer(variant, class_id, bias=5.0):
    """A tiny FCN that predicts `class_id` at every pixel: score layers zero, that class's bias positive."""
    model = build_fcn(variant, width=WIDTH)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("score"):
                param.zero_()
        model.score_fr.bias[class_id] = bias
    return model.eval()
