"""`fcn demo-data`: write a generated VOC2012/SBD-format mirror (pipelines/data/synthetic.py).

    fcn demo-data --out data/mirror --train 300 --val 100 --max-side 160
"""
from __future__ import annotations

import argparse
import sys
import time

from pipelines.core.exits import run_main
from pipelines.data.synthetic import OBJECTS, params_snippet, write_mirror


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fcn demo-data",
        description="Write a generated VOC2012/SBD-format mirror (VOCtrainval_11-May-2012.tar, benchmark.tgz).")
    parser.add_argument("--out", required=True, help="directory to write the two archives into")
    parser.add_argument("--train", type=int, default=300, help="SBD training images (default 300)")
    parser.add_argument("--val", type=int, default=100, help="validation images, at most 736 (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--max-side", type=int, default=500, help="longer image side in pixels (default 500)")
    parser.add_argument("--min-side", type=int, default=None, help="smallest shorter side (default 60%% of max side)")
    parser.add_argument("--objects", type=int, nargs=2, default=list(OBJECTS), metavar=("FEWEST", "MOST"),
                        help=f"objects per image (default {OBJECTS[0]} {OBJECTS[1]})")
    parser.add_argument("--object-scale", type=float, default=1.0,
                        help="multiplies every object's size (default 1)")
    parser.add_argument("--workers", type=int, default=0, help="processes, 0 = all cores (default 0)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    step = max(1, (args.train + args.val) // 10)

    def report(done: int, total: int) -> None:
        if total >= 50 and (done % step == 0 or done == total):
            print(f"images: {done}/{total}  ({time.perf_counter() - started:.1f}s)", file=sys.stderr, flush=True)

    def body():
        # write_mirror's ValueError is an argument out of range: a command-line error.
        result = write_mirror(args.out, n_train=args.train, n_val=args.val, seed=args.seed, max_side=args.max_side,
                              min_side=args.min_side, objects=tuple(args.objects),
                              object_scale=args.object_scale, workers=args.workers, progress=report)
        print(f"{result['voc']}  md5 {result['md5']['voc']}")
        print(f"{result['sbd']}  md5 {result['md5']['sbd']}")
        print(f"wrote {args.train} train + {args.val} val images in {time.perf_counter() - started:.1f}s;"
              " to use this mirror, put in params.yaml:\n")
        print(params_snippet(result), end="")

    return run_main("demo-data", body, resume="run the same command again")


if __name__ == "__main__":
    sys.exit(main())
