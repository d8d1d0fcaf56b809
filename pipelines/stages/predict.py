"""Predict: segmentation masks for images, from a registered model or a checkpoint directory.

    fcn predict IMAGE... [--model models:/fcn-voc@champion | models/fcn8s] [--out DIR] [--params params.yaml]
                         [--downscale]

For every image it writes <out>/<stem>_mask.png, a palette PNG whose pixel values
are the class ids and whose palette is the VOC colours (viewers show colours,
PIL/numpy read class ids), and <out>/<stem>_overlay.png, the mask blended over the
image; then prints the share of pixels of each class present. An MLflow model URI
resolves against the tracking store the params file names (the project's SQLite
store by default). Every image is read and checked before the model loads, so a bad
file stops the run before anything is written.

An image of more than inference.max_pixels pixels (the params file's, or
fcn_models.limits.MAX_PIXELS without one) is refused: the network's memory grows
with the pixels. With --downscale it is predicted at the largest size of its shape
within the limit, and the mask is scaled back to the image's size (nearest neighbour).
"""
import argparse
import pickle
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from fcn_models import palette
from fcn_models.limits import MAX_PIXELS, fitting_size
from pipelines.images import ImageError, class_shares, mask_image, read_image, resized, resized_mask, save_png
from pipelines.exits import run_main
from pipelines.modelsource import ModelSourceError, is_model_uri, open_store
from pipelines.params import load_params
from pipelines.serving import FCNSegmenter


class PredictError(RuntimeError):
    """Bad input (image, model, store); the message names it and says what to do."""


def load_predictor(model: str, params_path: str) -> Callable[[np.ndarray], np.ndarray]:
    """image (H, W, 3) uint8 -> mask (H, W) class ids, from a model URI or a checkpoint directory."""
    if is_model_uri(model):
        return _load_mlflow_model(model, params_path)
    directory = Path(model)
    if not directory.is_dir():
        raise PredictError(f"model {model}: no such checkpoint directory (give a directory holding model.pt "
                           "and meta.json, or a models:/<name>@<alias> URI)")
    try:
        return FCNSegmenter().load(directory).segment
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
        message = getattr(err, "message", str(err))
        raise PredictError(f"model {uri}: {message} (tracking store {store}; check the name and alias, "
                           "or run `fcn register`)") from None


def output_paths(images: list[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """(mask, overlay) paths per image; two images with one stem would overwrite each other."""
    stems = {}
    for image in images:
        if image.stem in stems:
            raise PredictError(f"{stems[image.stem]} and {image} would both write {image.stem}_mask.png: "
                               "predict them in separate runs or with different --out")
        stems[image.stem] = image
    return [(out_dir / f"{i.stem}_mask.png", out_dir / f"{i.stem}_overlay.png") for i in images]


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
    read_limit = None if downscale else limit
    try:
        for image in images:
            read_image(image, read_limit)
    except ImageError as err:
        raise PredictError(str(err)) from None
    segment = load_predictor(model, params_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for image_path, (mask_path, overlay_path) in zip(images, paths):
        image = read_image(image_path, read_limit)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fcn predict", description=__doc__.split("\n")[0],
        epilog="Writes <out>/<stem>_mask.png (palette PNG: pixel values are class ids, shown in the VOC colours) "
               "and <out>/<stem>_overlay.png per image, and prints the share of pixels of each class present.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--model", default=None,
                        help="an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION) or a checkpoint "
                             "directory (model.pt + meta.json); default: models:/<mlflow.model_name>@<mlflow.alias> "
                             "from the params file")
    parser.add_argument("--out", default=".", help="directory for the mask and overlay PNGs (default: the current "
                                                   "directory)")
    parser.add_argument("--params", default="params.yaml",
                        help="params file naming the tracking store that model URIs resolve against "
                             "(default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the mask in the overlay (default: 0.5)")
    parser.add_argument("--downscale", action="store_true",
                        help="predict an image above inference.max_pixels at the largest size within it and scale "
                             "the mask back up (default: refuse such an image)")
    args = parser.parse_args(argv)

    def body():
        model = args.model
        if model is None:
            config = load_params(args.params).mlflow
            model = f"models:/{config.model_name}@{config.alias}"
        for result in predict(args.images, model, args.out, args.params, args.alpha, args.downscale):
            height, width = result["size"]
            scaled = "" if result["predicted_at"] == result["size"] else \
                f", predicted at {result['predicted_at'][1]}x{result['predicted_at'][0]}"
            print(f"{result['image']} ({width}x{height}{scaled}): {result['mask']}, {result['overlay']}")
            for _, name, percent in result["shares"]:
                print(f"  {name:<12} {percent:6.2f}%")

    return run_main("predict", body, (PredictError, ImageError))


if __name__ == "__main__":
    sys.exit(main())
