"""Test helpers shared across parts: checkpoints."""
import json
from pathlib import Path

import numpy as np
import torch

from fcn_models.checkpoint import load_checkpoint, save_checkpoint
from fcn_models.fcn import build_fcn
from fcn_models.preprocess import normalize
from pipelines.core.files import file_sha256
from support.training import WIDTH


def make_checkpoint(directory: Path, seed: int, mean_iu: float, run_id: str | None = None) -> dict:
    """A tiny FCN-8s with random (non-zero) score layers, saved as the train stage writes it
    (training-time val scores, its MLflow run); returns the scores an evaluation gives it."""
    torch.manual_seed(seed)
    model = build_fcn("fcn8s", width=WIDTH)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("score"):
                param.normal_(0, 0.5)
    scores = {"pixel_acc": 0.8 + mean_iu / 10, "mean_acc": mean_iu + 0.1, "mean_iu": mean_iu, "fw_iu": mean_iu + 0.2}
    # Training's own val scores differ from evaluate's: the gate must use evaluate's.
    trained = {k: v / 2 for k, v in scores.items()}
    save_checkpoint(directory, model, {"stage": "fcn8s", "iterations": 10, "val": trained,
                                       **({"mlflow_run_id": run_id} if run_id else {})})
    return scores


def write_evaluation(params, stage: str, checkpoint: Path, scores: dict) -> None:
    """The evaluation report as the evaluate stage writes it, for this checkpoint."""
    path = Path(params.evaluate.report_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({stage: {**scores, "per_class_iu": {}, "images": 3,
                                        "weights_sha256": file_sha256(checkpoint / "model.pt")}}))


def checkpoint_mask(directory: Path, image: np.ndarray) -> np.ndarray:
    """What the checkpoint itself predicts for an (H, W, 3) uint8 image."""
    model, _ = load_checkpoint(directory)
    model.eval()
    with torch.no_grad():
        return model(normalize(image, model.input_norm)[None]).argmax(1)[0].numpy()


class RunsCode:
    """Unpickling this would create the file named: what a hostile model.pt carries."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def break_file(directory, how, tmp_path):
    model_file = directory / "model.pt"
    if how == "empty":
        model_file.write_bytes(b"")
    elif how == "truncated":
        model_file.write_bytes(model_file.read_bytes()[:1000])
    elif how == "text":
        model_file.write_text("not a torch file\n")
    elif how == "code-carrying":
        state = torch.load(model_file, weights_only=True)
        torch.save({**state, "payload": RunsCode(tmp_path / "pwned")}, model_file)
    elif how == "no state dict":
        torch.save([torch.zeros(3)], model_file)
