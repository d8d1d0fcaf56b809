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
import sys

from pipelines.core.exits import run_main
from pipelines.core.params import load_params
from pipelines.serve.model_source import default_model_uri
from pipelines.serve.segment_files import predict


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
        model = args.model if args.model is not None else default_model_uri(load_params(args.params))
        for result in predict(args.images, model, args.out, args.params, args.alpha, args.downscale):
            height, width = result["size"]
            scaled = "" if result["predicted_at"] == result["size"] else \
                f", predicted at {result['predicted_at'][1]}x{result['predicted_at'][0]}"
            print(f"{result['image']} ({width}x{height}{scaled}): {result['mask']}, {result['overlay']}")
            for _, name, percent in result["shares"]:
                print(f"  {name:<12} {percent:6.2f}%")

    return run_main("predict", body)


if __name__ == "__main__":
    sys.exit(main())
