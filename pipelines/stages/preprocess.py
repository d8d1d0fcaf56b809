"""Preprocess stage: the extracted VOC2012 and SBD trees -> Parquet shards (pipelines.data.build_shards).

    python -m pipelines.stages.preprocess [--params params.yaml]     (or `fcn preprocess`)

Writes data/shards/{train,val}/part-NNNNN.parquet (train = SBD train.txt, val =
seg11valid), data/stats.json and data/rejected.json, as data.* in the params file says.
"""
import argparse
import sys

from pipelines.core.exits import run_main
from pipelines.core.params import load_params
from pipelines.data.build_shards import preprocess


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml",
                        help="params file; relative data paths are taken from its directory (default: %(default)s)")
    parser.add_argument("--progress-every", type=int, default=1000, metavar="N",
                        help="print a progress line every N images (default: %(default)s)")
    args = parser.parse_args(argv)

    def body():
        data = load_params(args.params).data
        preprocess(data.raw_dir, data.shards_dir, data.stats_file, data.rejected_file,
                   shard_max_bytes=data.shard_max_bytes, on_bad_sample=data.on_bad_sample,
                   workers=data.workers, progress_every=max(args.progress_every, 1))

    return run_main("preprocess", body)


if __name__ == "__main__":
    sys.exit(main())
