"""A checkpoint as an ONNX model that takes what the served model takes.

    export_onnx(checkpoint_dir, out_file)   write it (all or nothing), checked against PyTorch
    run_onnx(path_or_session, image)        (scores, mask) of one image with onnxruntime

The graph's input is `image`, one RGB image (H, W, 3) uint8 of any height and width;
the checkpoint's input normalisation is part of the graph, so callers never
normalise. Outputs: `scores` (1, C, H, W) float32, the class scores, and `mask`
(H, W) uint8, their argmax. The ONNX file's metadata names the network (variant,
backbone, width, classes, input normalisation) and the weights' sha256.

Height and width stay dynamic: every crop and skip fusion in fcn_models.fcn is
sliced by the shapes of the tensors, which the trace records as shape arithmetic,
not as the numbers of the example it traced. The exporter is torch's TorchScript-based
one: the torch.export-based one gives the same graph for these networks but its
symbolic shape analysis makes each export (the register stage runs one) many times
slower on a small CPU. Every export is checked before it is written: onnxruntime
and PyTorch must give the same masks on two images of odd sizes unlike the traced one.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from fcn_models.checkpoint import MODEL_FILE, load_checkpoint
from fcn_models.errors import FCNError
from fcn_models.outputs import make_dirs
from fcn_models.preprocess import normalize
from pipelines.core.files import file_sha256

OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("scores", "mask")
# The traced example and the sizes the export is checked on (odd, and not multiples of 32).
TRACE_SIZE = (64, 96)
CHECK_SIZES = ((37, 53), (71, 45))


class ExportError(FCNError, RuntimeError):
    """A checkpoint that cannot be exported; the message names it and says why."""


class ImageToScores(torch.nn.Module):
    """(H, W, 3) uint8 RGB -> (1, C, H, W) scores and (H, W) uint8 mask, normalisation included."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        scores = self.model(normalize(image.permute(2, 0, 1), self.model.input_norm)[None])
        return scores, scores.argmax(1)[0].to(torch.uint8)


def _session(path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(model, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, mask) of one (H, W, 3) uint8 image; `model` an ONNX file or an onnxruntime session."""
    session = model if hasattr(model, "run") else _session(model)
    scores, mask = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(image, dtype=np.uint8)})
    return scores, mask


def export_onnx(checkpoint_dir, out_file) -> Path:
    """Export the checkpoint to out_file (a temp file beside it, renamed into place once checked)."""
    import onnx

    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    try:
        model, meta = load_checkpoint(checkpoint_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise ExportError(f"{checkpoint_dir}: cannot load the checkpoint: {err}") from None
    wrapped = ImageToScores(model.eval()).eval()
    example = torch.zeros((*TRACE_SIZE, 3), dtype=torch.uint8)
    make_dirs(out_file.parent, f"--onnx {out_file}")
    fd, tmp = tempfile.mkstemp(dir=out_file.parent, prefix=f".{out_file.name}.", suffix=".onnx")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # The tracer warns about every Python-level shape check it passes; the graph is
            # checked on other sizes below instead.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped, (example,), tmp, dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "height", 1: "width"}, "scores": {2: "height", 3: "width"},
                              "mask": {0: "height", 1: "width"}},
            )
        graph = onnx.load(tmp)
        described = {"variant": model.variant, "backbone": model.backbone_name, "width": repr(model.width),
                     "num_classes": str(model.num_classes), "input_norm": model.input_norm.name,
                     "weights_sha256": file_sha256(checkpoint_dir / MODEL_FILE),
                     "stage": str(meta.get("stage", ""))}
        onnx.helper.set_model_props(graph, described)
        onnx.checker.check_model(graph)
        onnx.save(graph, tmp)
        _check_against_torch(wrapped, tmp, checkpoint_dir)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_file


def _check_against_torch(wrapped: ImageToScores, onnx_file, checkpoint_dir: Path) -> None:
    session = _session(onnx_file)
    rng = np.random.default_rng(0)
    for size in CHECK_SIZES:
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        with torch.inference_mode():
            _, expected = wrapped(torch.from_numpy(image))
        _, mask = run_onnx(session, image)
        if mask.shape != size or not np.array_equal(mask, expected.numpy()):
            raise ExportError(f"{checkpoint_dir}: the exported ONNX graph predicts other masks than PyTorch at "
                              f"{size[0]}x{size[1]}: its crops did not trace as functions of the input size")
