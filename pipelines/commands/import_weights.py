"""`fcn import`: the reference's released weights into our formats.

    fcn import fcn8s-heavy-pascal.caffemodel --out models/fcn8s-reference
    fcn import VGG_ILSVRC_16_layers.caffemodel --out weights/vgg16_caffe.pth
    fcn import fcn8s-atonce_from_caffe.pth --out models/fcn8s-atonce [--variant V] [--backbone B]

SOURCE is a caffemodel (by content, or its .caffemodel suffix) or a PyTorch state dict
(pytorch-fcn's *_from_caffe.pth). An FCN becomes a checkpoint directory, the VGG16
ImageNet classifier a torchvision-format state dict. The work is fcn_models.reference's;
this module parses arguments and reports. Exit status: 0 done, 1 bad input, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import sys

from fcn_models.backbones import BACKBONES
from fcn_models.fcn import VARIANTS
from fcn_models.reference import import_weights
from pipelines.core.exits import run_main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcn import", description=__doc__.split("\n")[0])
    parser.add_argument("source", metavar="SOURCE", help="a .caffemodel or a PyTorch state dict (.pth)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="checkpoint directory (FCNs) or state-dict file (the VGG16 classifier)")
    parser.add_argument("--variant", choices=VARIANTS, help="override the variant read off the layers present")
    parser.add_argument("--backbone", choices=BACKBONES, help="override the backbone read off the layer names")
    return parser


def main(argv=None) -> int:
    def body():
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exit_:  # argparse: 2 for bad arguments, 0 for --help
            return int(exit_.code or 0)
        result = import_weights(args.source, args.out, variant=args.variant, backbone=args.backbone)
        print("\n".join(result.lines()))

    return run_main("fcn import", body, resume="nothing was written; run it again")


if __name__ == "__main__":
    sys.exit(main())
