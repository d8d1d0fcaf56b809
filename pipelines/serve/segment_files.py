"""Segmenting image files with a model: masks, overlays and class shares, in this process.

    predict(images, model, out_dir, params_path, alpha, downscale)   the PNGs written; per image
                                             its files, class shares and the size it was predicted at
    load_predictor(model, params_path)       image -> mask, from a models:/ URI or a checkpoint directory

Every image is read and checked before the model loads, so a bad file stops the run
before anything is written. An image of more than inference.max_pixels pixels (the
params file's, or fcn_models.limits.MAX_PIXELS without one) is refused, or with
`downscale` predicted at the largest size of its shape within the limit and its mask
scaled back up (nearest neighbour); --downscale reads images of at most
fcn_models.limits.downscale_limit(max_pixels) pixels. `fcn predict` (pipelines/commands/predict.py) is
the command around it.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from fcn_models import palette
from fcn_models.errors import FCNError
from fcn_models.limits import DOWNSCALE_FACTOR, MAX_PIXELS, downscale_limit, fitting_size
from fcn_models.outputs import make_dirs
from pipelines.core.params import load_params
from pipelines.serve.images import (
    ImageError,
    class_shares,
    mask_image,
    read_image,
    resized,
    resized_mask,
    save_png,
    written_paths,
)
from pipelines.serve.model_source import (
    ModelSourceError,
    is_model_uri,
    missing_model_message,
    open_store,
)
from pipelines.serve.pyfunc_model import FCNSegmenter


class PredictError(FCNError, RuntimeError):
    """Bad input (image, model, store); the message names it and says what to do."""


def load_predictor(model: str, params_path: str) -> Callable[[np.ndarray], np.ndarray]:
    """image (H, W, 3) uint8 -> mask (H, W) class ids, from a model URI or a checkpoint directory.

    A checkpoint directory takes images up to the params' inference.max_pixels; a registered
    model keeps the limit it was registered with."""
    if is_model_uri(model):
        return _load_mlflow_model(model, params_path)
    directory = Path(model)
    if not directory.is_dir():
        raise PredictError(f"model {model}: no such checkpoint directory (give a directory holding model.pt "
                           "and meta.json, or a models:/<name>@<alias> URI)")
    try:
        return FCNSegmenter().load(directory, max_pixels=pixel_limit(params_path)).segment
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        raise PredictError(f"model {model}: {err}") from None


def _load_mlflow_model(uri: str, params_path: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        store = open_store(load_params(params_path), uri)
    except ModelSourceError as err:
        raise PredictError(str(err)) from None
    try:
        return mlflow.pyfunc.load_model(uri).predict
    except (MlflowException, OSError) as err:
        raise PredictError(missing_model_message(uri, err, store)) from None


def output_paths(images: list[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """(mask, overlay) paths per image; two images with one stem would overwrite each other."""
    stems = {}
    for image in images:
        if image.stem in stems:
            raise PredictError(f"{stems[image.stem]} and {image} would both write {written_paths(out_dir, image.stem)[0].name}: "
                               "predict them in separate runs or with different --out")
        stems[image.stem] = image
    return [written_paths(out_dir, i.stem) for i in images]


def pixel_limit(params_path: str) -> int:
    """inference.max_pixels of the params file; the library's default when there is no file."""
    return load_params(params_path).inference.max_pixels if Path(params_path).is_file() else MAX_PIXELS


def predict(images: list, model: str, out_dir=".", params_path: str = "params.yaml", alpha: float = 0.5,
            downscale: bool = False) -> list[dict]:
    """Write mask and overlay PNGs for each image; return per image its files, class shares and the
    size it was predicted at."""
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise PredictError(f"--alpha {alpha}: expected a value in [0, 1]")
    images = [Path(i) for i in images]
    out_dir = Path(out_dir)
    paths = output_paths(images, out_dir)
    limit = pixel_limit(params_path)
    # --downscale holds the whole image and its full-size outputs: refused past a bound of its own.
    read = {"max_pixels": downscale_limit(limit), "too_large_advice": "scale it down first",
            "limit_name": f"the most --downscale reads, {DOWNSCALE_FACTOR} x inference.max_pixels"} \
        if downscale else {"max_pixels": limit}
    try:
        for image in images:
            read_image(image, **read)
    except ImageError as err:
        raise PredictError(str(err)) from None
    segment = load_predictor(model, params_path)
    make_dirs(out_dir, f"--out {out_dir}")
    results = []
    for image_path, (mask_path, overlay_path) in zip(images, paths):
        image = read_image(image_path, **read)
        size = image.shape[:2]
        predicted_at = fitting_size(*size, limit)
        try:
            if predicted_at == size:
                mask = np.asarray(segment(image))
            else:
                mask = resized_mask(np.asarray(segment(resized(image, predicted_at))), size)
        except ValueError as err:  # the served model's own checks (its limit may be lower)
            raise PredictError(f"{image_path}: {err}") from None
        save_png(mask_image(mask), mask_path)
        save_png(Image.fromarray(palette.overlay(image, mask, alpha)), overlay_path)
        results.append({"image": image_path, "size": size, "predicted_at": predicted_at, "mask": mask_path,
                        "overlay": overlay_path, "shares": class_shares(mask)})
    return results
