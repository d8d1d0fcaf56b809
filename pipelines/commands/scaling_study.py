"""Scaling study: one stage at several global batches under train.scaling's rule, each for several seeds.

    python -m pipelines.commands.scaling_study --stage fcn32s --seeds 0 1 2 [--configs 1x1 2x1 1x4]
        [--warmup-images N] [--crop-size N] [--params params.yaml]          (or `fcn scaling-study ...`)

Each configuration (WORKERSxIMAGES: workers x images a worker; more than one image a worker
means crops) trains the stage with train.scaling set to its optimizer's rule, so all of
them see the same images; outputs under models/scaling/<config> and reports/scaling/<config>,
an MLflow parent run per configuration with a child per seed. Then the first configuration's
seeds set the spread the others are held to: reports/scaling/<stage>.md (the table),
<stage>.json and the curves against images seen in reports/figures/scaling-<stage>.png
(pipelines/train/scaling_study.py says how).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from pipelines.core.exits import run_main
from pipelines.core.params import load_params, project_dir
from pipelines.track.scaling_report import table_lines
from pipelines.train.scaling_study import DEFAULT_CONFIGS, parse_config, report_paths, run_study


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn scaling-study", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, help="the stage to train: a key of train.stages in params")
    parser.add_argument("--seeds", required=True, type=int, nargs="+", metavar="SEED",
                        help="the seeds every configuration runs, two or more (train.seed)")
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="WxB",
                        help="workers x images a worker; the first is the reference (default: %(default)s)")
    parser.add_argument("--warmup-images", type=int, default=None, metavar="N",
                        help="train.warmup_images for every configuration (default: the params')")
    parser.add_argument("--crop-size", type=int, default=None, metavar="N",
                        help="augment.crop_size for the configurations with crops (default: the params')")
    parser.add_argument("--params", default="params.yaml",
                        help="params file; relative paths in it are taken from its directory (default: %(default)s)")
    args = parser.parse_args(argv)

    def body():
        configs = [parse_config(text) for text in args.configs]
        params = load_params(args.params)
        doc = run_study(params, args.stage, configs, args.seeds, project_dir(args.params),
                        warmup_images=args.warmup_images, crop_size=args.crop_size)
        print(f"[scaling-study] {args.stage}, val mean IU in percent, over seeds {' '.join(map(str, args.seeds))} "
              f"(train.scaling {doc['rule']}):", flush=True)
        for line in table_lines(doc):
            print("  " + line, flush=True)
        print("[scaling-study] written to " + ", ".join(str(p) for p in report_paths(params, args.stage)), flush=True)

    command = shlex.join(["fcn", "scaling-study", *(argv if argv is not None else sys.argv[1:])])
    return run_main("scaling-study", body,
                    resume=f"run `{command}` again: each seed of each configuration resumes from its last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
