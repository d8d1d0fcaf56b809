"""Predict-batch: masks, overlays and class shares for many images, as a Ray Data job.

    fcn predict-batch SOURCE --out DIR [--model models:/fcn-voc@champion | models/fcn8s]
                      [--actors N] [--cpus-per-actor C] [--params params.yaml]

SOURCE is a directory (every image file under it), a glob ('photos/**/*.jpg') or a
Parquet file of encoded images (an `image` column of bytes, an `id` column naming
them). An actor pool segments them (pipelines/serve/batch.py): one actor per GPU when
ray.use_gpu, else CPU actors; it joins ray.address / RAY_ADDRESS (in `ray job
submit`, the job's cluster) or starts a local Ray on 127.0.0.1. Per image
DIR/<name>_mask.png and DIR/<name>_overlay.png; DIR/summary.parquet has a row per
image: size, files, share of each class in percent, or the error of an image that
failed. Failed images are listed at the end; the others are written all the same.
"""
import argparse
import sys
import tempfile
from pathlib import Path

from pipelines.core.exits import run_main
from pipelines.core.params import load_params
from pipelines.serve import batch
from pipelines.serve.batch import BatchError
from pipelines.serve.model_source import (
    default_model_uri,
    is_model_uri,
    local_checkpoint,
)
from pipelines.train import cluster


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn predict-batch", description=__doc__.split("\n")[0])
    parser.add_argument("source", metavar="SOURCE", help="a directory of images, a glob, or a .parquet file")
    parser.add_argument("--out", required=True, help="directory for the PNGs and summary.parquet")
    parser.add_argument("--model", default=None,
                        help="an MLflow model URI or a checkpoint directory (default: "
                             "models:/<mlflow.model_name>@<mlflow.alias> from the params file)")
    parser.add_argument("--actors", type=int, default=None,
                        help="segmenting actors (default: one per GPU with ray.use_gpu, else one per "
                             "--cpus-per-actor CPUs of the cluster)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0,
                        help="CPUs (and torch threads) per CPU actor (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the mask in the overlay (default: 0.5)")
    parser.add_argument("--params", default="params.yaml",
                        help="params file: the tracking store model URIs resolve against, and the ray section "
                             "(address, use_gpu) (default: %(default)s)")
    args = parser.parse_args(argv)

    def body():
        if not 0.0 <= args.alpha <= 1.0:
            raise BatchError(f"--alpha {args.alpha}: expected a value in [0, 1]")
        if args.actors is not None and args.actors < 1 or args.cpus_per_actor <= 0:
            raise BatchError("--actors must be >= 1 and --cpus-per-actor > 0")
        params = load_params(args.params)
        inside = cluster.paths_inside_job_copy({"--out": args.out})
        if inside:
            raise BatchError(f"{', '.join(inside)} lies inside this Ray job's temporary copy of the working "
                             "directory and would be lost: give --out as an absolute path (\"$PWD/predictions\")")
        inputs = batch.list_inputs(args.source)
        model = args.model or default_model_uri(params)
        with tempfile.TemporaryDirectory(prefix="fcn-predict-batch-") as scratch:
            checkpoint = local_checkpoint(model, params if is_model_uri(model) else None, Path(scratch))
            # A registered model keeps the limit it was registered with; a checkpoint directory takes the params'.
            max_pixels = None if is_model_uri(model) else params.inference.max_pixels
            batch.check_checkpoint(checkpoint)
            cluster.connect(params.ray)
            rows = batch.run_batch(inputs, checkpoint, Path(args.out), params.ray.use_gpu, args.actors,
                                   args.cpus_per_actor, args.alpha, max_pixels)
        failed = [r for r in rows if r["error"]]
        print(f"[predict-batch] {len(rows) - len(failed)} of {len(rows)} images segmented: masks and overlays in "
              f"{args.out}, class shares in {Path(args.out) / batch.SUMMARY_FILE}", flush=True)
        if failed:
            print(f"[predict-batch] {len(failed)} failed (column error of the summary):", file=sys.stderr)
            for row in failed:
                print(f"  {row['error']}", file=sys.stderr)
        sys.stderr.flush()

    return run_main("predict-batch", body)


if __name__ == "__main__":
    sys.exit(main())
