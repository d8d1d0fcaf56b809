"""Seeds: a training stage run once per seed, and the spread of its scores (mean ± sample std).

    python -m pipelines.commands.seeds --stage fcn8s --seeds 0 1 2 [--params params.yaml] [--evaluate]
                                                                            (or `fcn seeds ...`)

Each seed trains the stage as `fcn train` does, with train.seed set to it and its outputs in
models/seeds/seed-<k>/<stage> and reports/seeds/seed-<k>/<stage> (the pipeline's models/<stage>
and reports/<stage> are left alone), from the same starting weights as the pipeline's stage.
The mean and sample standard deviation of each score over the seeds go to
reports/seeds/<stage>.json, to the terminal, to an MLflow run `seeds-<stage>` with a child
run per seed, and (the next time `fcn evaluate` runs) to reports/evaluation.md
(pipelines/train/seeds.py says how).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from pipelines.core.errors import UsageError
from pipelines.core.exits import run_main
from pipelines.core.params import load_params, project_dir
from pipelines.track.seed_spread import SOURCES, check_seeds, spread_file, spread_lines
from pipelines.track.val_scores import pick_device
from pipelines.train.seeds import run_seeds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn seeds", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, help="the stage to train: a key of train.stages in params")
    parser.add_argument("--seeds", required=True, type=int, nargs="+", metavar="SEED",
                        help="the seeds, two or more (train.seed of each run)")
    parser.add_argument("--params", default="params.yaml",
                        help="params file; relative paths in it are taken from its directory (default: %(default)s)")
    parser.add_argument("--evaluate", action="store_true",
                        help="score each seed's checkpoint on all of val as `fcn evaluate` does, and take the spread "
                             "of those scores (default: of each seed's best validation scores while training)")
    parser.add_argument("--device", default=None,
                        help="with --evaluate: auto (CUDA when available, else CPU), cpu, cuda or cuda:N "
                             "(default: auto)")
    args = parser.parse_args(argv)

    def body():
        check_seeds(args.seeds)
        if args.device is not None and not args.evaluate:
            raise UsageError(f"--device {args.device}: only --evaluate runs a network here; add --evaluate, "
                             "or leave --device out")
        params = load_params(args.params)
        device = pick_device(args.device or "auto") if args.evaluate else None
        doc = run_seeds(params, args.stage, args.seeds, project_dir(args.params), evaluate=args.evaluate,
                        device=device)
        print(f"[seeds] {args.stage} over {doc['k']} seeds, in percent; {SOURCES[doc['source']]}:", flush=True)
        for line in spread_lines(doc):
            print("  " + line, flush=True)
        print(f"[seeds] written to {spread_file(params, args.stage)} and MLflow run {doc['mlflow_run_id']}; "
              "`fcn evaluate` adds the spread to its table", flush=True)

    command = shlex.join(["fcn", "seeds", *(argv if argv is not None else sys.argv[1:])])
    return run_main("seeds", body, resume=f"run `{command}` again: each seed resumes from its last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
