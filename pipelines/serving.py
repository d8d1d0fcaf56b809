"""The served model: a plain RGB image in, a mask of class ids out.

    FCNSegmenter().load("models/fcn8s").segment(image)    # (H, W, 3) uint8 RGB -> (H, W) uint8 class ids

FCNSegmenter is also the MLflow pyfunc of the registered model. The register
stage logs this file as the model's code (MLflow's "models from code"), a copy of
fcn_models as its code path and the checkpoint (model.pt + meta.json) as an
artifact, so

    mlflow.pyfunc.load_model("models:/fcn-voc@champion").predict(image)

needs only the packages in the model's requirements (mlflow, torch, torchvision,
numpy), no checkout of this project. The input normalisation comes from the
checkpoint's meta.json, so callers never normalise.

This file must import nothing from `pipelines`: the logged model carries only it
and fcn_models.
"""
import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from fcn_models import limits
from fcn_models.checkpoint import load_checkpoint
from fcn_models.preprocess import normalize

# Key of the checkpoint directory among the logged model's artifacts.
CHECKPOINT_ARTIFACT = "checkpoint"


def check_image(image, max_pixels: int = limits.MAX_PIXELS) -> np.ndarray:
    """The image as a (H, W, 3) uint8 array of at most max_pixels pixels, or a ValueError saying
    what it is instead."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected one RGB image as a (H, W, 3) uint8 array, got shape {image.shape} "
                         f"dtype {image.dtype} (convert grayscale or RGBA images to RGB first)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image of shape {image.shape} has no pixels")
    why = limits.too_large(image.shape[0], image.shape[1], max_pixels)
    if why:
        raise ValueError(f"image of {why}, this model's limit: scale it down first")
    return image


class FCNSegmenter(PythonModel):
    """An FCN checkpoint behind a one-image-in, one-mask-out interface."""

    def __init__(self):
        self.model = None
        self.meta = None
        self.device = None
        self.max_pixels = limits.MAX_PIXELS

    def load(self, checkpoint_dir, device=None) -> "FCNSegmenter":
        """Load a checkpoint directory (weights with weights_only=True) onto `device` (default: CUDA if present)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, meta = load_checkpoint(checkpoint_dir, map_location=device)
        if model.num_classes > 256:
            raise ValueError(f"{checkpoint_dir}: {model.num_classes} classes do not fit the uint8 masks served")
        self.model, self.meta, self.device = model.eval(), meta, device
        # The limit the model was registered with (inference.max_pixels), else the library's.
        self.max_pixels = int(meta.get(limits.META_KEY, limits.MAX_PIXELS))
        return self

    def segment(self, image) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) uint8 class ids, the argmax of the class scores at each pixel."""
        if self.model is None:
            raise RuntimeError("no checkpoint loaded: call load(checkpoint_dir) first")
        image = check_image(image, self.max_pixels)
        if not image.flags.writeable:
            image = image.copy()  # PIL's arrays are read-only, which torch.from_numpy warns about
        with torch.inference_mode():
            # The uint8 pixels go to the device, a quarter of the float bytes; normalised there.
            pixels = torch.from_numpy(image).to(self.device).permute(2, 0, 1)
            scores = self.model(normalize(pixels, self.model.input_norm)[None])
        return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()

    # The pyfunc interface.

    def load_context(self, context):
        self.load(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        return self.segment(model_input)


# What MLflow loads when this file is the logged model's code.
mlflow.models.set_model(FCNSegmenter())
