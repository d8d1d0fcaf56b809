"""Export: a checkpoint or a registered model as an ONNX model with dynamic height and width.

    fcn export SOURCE --onnx OUT [--params params.yaml]

SOURCE is a checkpoint directory (model.pt + meta.json, e.g. models/fcn8s) or an MLflow
model URI (models:/fcn-voc@champion, models:/fcn-voc/3), resolved against the tracking
store the params file names. OUT takes one RGB image (H, W, 3) uint8 of any size and
gives `scores` (1, C, H, W) and `mask` (H, W) (pipelines/serve/onnx_export.py); it is checked
against PyTorch before it is written, and written whole or not at all.
"""
import argparse
import sys
import tempfile
from pathlib import Path

from pipelines.core.exits import run_main
from pipelines.core.params import load_params
from pipelines.serve.model_source import is_model_uri, local_checkpoint
from pipelines.serve.onnx_export import export_onnx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn export", description=__doc__.split("\n")[0])
    parser.add_argument("source", metavar="SOURCE",
                        help="a checkpoint directory or an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION)")
    parser.add_argument("--onnx", required=True, metavar="OUT", help="the ONNX file to write")
    parser.add_argument("--params", default="params.yaml",
                        help="params file naming the tracking store that model URIs resolve against "
                             "(default: %(default)s; only read for a URI)")
    args = parser.parse_args(argv)

    def body():
        with tempfile.TemporaryDirectory(prefix="fcn-export-") as scratch:
            params = load_params(args.params) if is_model_uri(args.source) else None
            checkpoint = local_checkpoint(args.source, params, Path(scratch))
            out = export_onnx(checkpoint, Path(args.onnx))
        print(f"[export] {args.source} -> {out} (input image (H, W, 3) uint8; outputs scores, mask)", flush=True)

    return run_main("export", body)


if __name__ == "__main__":
    sys.exit(main())
