"""The served model: a plain RGB image in, a mask of class ids out.

    FCNSegmenter().load("models/fcn8s").segment(image)    # (H, W, 3) uint8 RGB -> (H, W) uint8 class ids

FCNSegmenter is also the MLflow pyfunc of the registered model. The register
stage logs this file as the model's code (MLflow's "models from code"), a copy of
fcn_models as its code path and the checkpoint (model.pt + meta.json) as an
artifact, so

    mlflow.pyfunc.load_model("models:/fcn-voc@champion").predict(image)

needs only the packages in the model's requirements (mlflow, torch, torchvision,
numpy), no checkout of this project. The input normalisation comes from the
checkpoint's meta.json, so callers never normalise. `check_image` is the one place
where input is checked (shape, channels, pixel dtype and range), for every caller:
`fcn predict`, batch inference and the scoring server of `mlflow models serve`, which
answers its ValueError with a 400 saying what to send.

This file must import nothing from `pipelines`: the logged model carries only it
and fcn_models.
"""
import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from fcn_models import limits
from fcn_models.checkpoint import load_checkpoint
from fcn_models.preprocess import normalize

# Keys of the logged model's artifacts: the checkpoint directory, and the same network as
# ONNX (pipelines/serve/onnx_export.py), which serving does not load.
CHECKPOINT_ARTIFACT = "checkpoint"
ONNX_ARTIFACT = "onnx"
# What every refusal asks for instead.
WHAT_TO_SEND = ("send one RGB image as an (H, W, 3) array of uint8 pixel values 0..255 "
                "(as JSON: {\"inputs\": [[[r, g, b], ...], ...]} of integers)")


def check_image(image, max_pixels: int = limits.MAX_PIXELS) -> np.ndarray:
    """One RGB image as a (H, W, 3) uint8 array of at most max_pixels pixels, or a ValueError
    saying what it is and what to send.

    The one place of input checks. Integer pixels of any integer dtype are taken when
    they lie in 0..255: JSON carries no uint8, so the scoring server hands in int64.
    Floats are refused, not rounded: a float image is most often scaled to 0..1, which
    cast to uint8 is a black picture and an all-background mask.
    """
    try:
        image = np.asarray(image)
    except ValueError as err:  # ragged nested lists
        raise ValueError(f"not a rectangular array of pixels ({err}): {WHAT_TO_SEND}") from None
    shape, dtype = tuple(image.shape), image.dtype
    if image.ndim == 4:
        raise ValueError(f"got a batch of {shape[0]} images, shape {shape}: {WHAT_TO_SEND}, "
                         "one image per call (post the others one at a time)")
    if image.ndim == 2:
        raise ValueError(f"got a 2-D array of shape {shape} (a grayscale image?): {WHAT_TO_SEND}; "
                         "convert grayscale to RGB first, e.g. PIL's image.convert('RGB')")
    if image.ndim != 3:
        raise ValueError(f"got an array of shape {shape}: {WHAT_TO_SEND}")
    if shape[2] == 4:
        raise ValueError(f"got 4 channels, shape {shape} (RGBA?): {WHAT_TO_SEND}; drop the alpha channel, "
                         "e.g. PIL's image.convert('RGB')")
    if shape[2] != 3:
        raise ValueError(f"got {shape[2]} channels, shape {shape}: {WHAT_TO_SEND}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"image of shape {shape} has no pixels: {WHAT_TO_SEND}")
    why = limits.too_large(shape[0], shape[1], max_pixels)
    if why:
        raise ValueError(f"image of {why}, this model's limit: scale it down first")
    if dtype.kind == "f":
        low, high = float(np.nanmin(image)), float(np.nanmax(image))
        raise ValueError(f"got float pixels ({dtype}, values {low:.4g}..{high:.4g}): {WHAT_TO_SEND}; a float "
                         "image in 0..1 becomes one with (image * 255).round().astype(numpy.uint8)")
    if dtype.kind not in "ui":
        raise ValueError(f"got pixels of dtype {dtype}: {WHAT_TO_SEND}")
    if dtype != np.uint8:
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(f"pixel values {low}..{high} lie outside 0..255: {WHAT_TO_SEND}")
        image = image.astype(np.uint8)
    return image


class FCNSegmenter(PythonModel):
    """An FCN checkpoint behind a one-image-in, one-mask-out interface."""

    def __init__(self):
        self.model = None
        self.meta = None
        self.device = None
        self.max_pixels = limits.MAX_PIXELS

    def load(self, checkpoint_dir, device=None, max_pixels: int | None = None) -> "FCNSegmenter":
        """Load a checkpoint directory (weights with weights_only=True) onto `device` (default: CUDA if present).

        max_pixels: the largest image it takes; default the limit the model was registered with
        (meta.json's), else the library's."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, meta = load_checkpoint(checkpoint_dir, map_location=device)
        if model.num_classes > 256:
            raise ValueError(f"{checkpoint_dir}: {model.num_classes} classes do not fit the uint8 masks served")
        self.model, self.meta, self.device = model.eval(), meta, device
        self.max_pixels = int(max_pixels or meta.get(limits.META_KEY, limits.MAX_PIXELS))
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
        try:
            image = check_image(model_input, self.max_pixels)
        except ValueError as err:
            # MLflow's scoring server answers this error code with a 400 and the message.
            raise MlflowException.invalid_parameter_value(str(err)) from None
        return self.segment(image)


# What MLflow loads when this file is the logged model's code.
mlflow.models.set_model(FCNSegmenter())
