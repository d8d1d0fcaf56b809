"""`fcn standin`: train the ImageNet stand-in, a width-scaled VGG16 classifier on generated pictures.

    fcn standin --out models/standin/vgg16-w0.125.pth --width 0.125 --minutes 40 --seed 0
    fcn standin --out /tmp/s.pth --width 0.125 --steps 5 --heldout 20

Writes <name>.pth (torchvision's vgg16 state dict at that width), <name>.json (how it was
made, its held-out accuracy, the file's sha256) and <name>.csv (the training log). The
work is pipelines.train.standin's; this module parses arguments and reports.
Exit status: 0 done, 1 could not write or train, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from pipelines.core.exits import run_main
from pipelines.train.standin import HELDOUT_IMAGES, output_paths, train_standin


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcn standin", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, metavar="PATH.pth",
                        help="the weights file; its meta (.json) and training log (.csv) go beside it")
    parser.add_argument("--width", required=True, type=float,
                        help="channel scale of VGG16, the FCN's model.width (the demo's: 0.125)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="training steps")
    budget.add_argument("--minutes", type=float, help="train for about this wall time (the steps are fixed early)")
    parser.add_argument("--heldout", type=int, default=HELDOUT_IMAGES,
                        help=f"held-out pictures for accuracy (default {HELDOUT_IMAGES})")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body():
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exit_:  # argparse: 2 for bad arguments, 0 for --help
            return int(exit_.code or 0)
        meta = train_standin(args.out, width=args.width, seed=args.seed, steps=args.steps, minutes=args.minutes,
                             heldout=args.heldout, command=shlex.join(["fcn", "standin", *argv]))
        meta_file, log_file = output_paths(args.out)
        print(f"{args.out}  sha256 {meta['sha256']}  ({meta['dtype']}, held-out top-1 {meta['heldout_top1']:.3f})")
        print(f"{meta_file}\n{log_file}")

    return run_main("fcn standin", body, resume="nothing was written but the training log; run it again")


if __name__ == "__main__":
    sys.exit(main())
