"""Train stage: one stage of the FCN schedule on Ray Train (pipelines/train/trainer.py).

    python -m pipelines.stages.train --stage fcn32s|fcn16s|fcn8s|fcn8s-atonce|fcn32s-fixed
                                                                          (or `fcn train --stage ...`)

FCN-32s (and at-once FCN-8s, and FCN-32s-fixed) start from the ImageNet classifier;
FCN-16s from FCN-32s's best checkpoint in models/fcn32s, FCN-8s from FCN-16s's.
Outputs: models/<stage>/ (model.pt + meta.json), reports/<stage>/metrics.json and
history.csv, and one MLflow run. Run again with the same run name, the stage resumes
from its last checkpoint.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ray.train import TrainingFailedError

from pipelines.core.errors import StageError
from pipelines.core.exits import run_main
from pipelines.core.params import load_params, project_dir
from pipelines.train import trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn train", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, help="the stage to train: a key of train.stages in params")
    parser.add_argument("--params", default="params.yaml",
                        help="params file; relative paths in it are taken from its directory, so outputs land "
                             "there: in a Ray job, give the project's file by absolute path (default: %(default)s)")
    parser.add_argument("--run-name", default=None,
                        help="Ray Train run name; a run with this name resumes from its last checkpoint "
                             "(default: the stage and a fingerprint of its parameters, code, data and init)")
    parser.add_argument("--trace-dir", default=None,
                        help="write each attempt's start iteration, its workers' pids and every step to this "
                             "directory (what a run resumed after a failure redid); off by default")
    args = parser.parse_args(argv)

    def body():
        params = load_params(args.params)
        trainer.check_outputs_outside_job_copy(params)
        try:
            metrics = trainer.run_stage(params, args.stage, project_dir(args.params), args.run_name,
                                         trace_dir=args.trace_dir and str(Path(args.trace_dir).resolve()))
        except TrainingFailedError as err:
            raise StageError(f"stage {args.stage} failed after ray.max_failures retries: {err}\nRunning it again "
                             "with the same run name resumes from its last checkpoint.") from None
        print(f"[{args.stage}] best mean IU {metrics['mean_iu']:.4f} at iteration {metrics['best_iteration']} "
              f"of {metrics['iterations']}", flush=True)

    return run_main("train", body,
                    resume=f"run `{resume_command(parser, args)}` again: it resumes from the last checkpoint")


def resume_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that resumes this stage: the options given away from their defaults too,
    since another params file or run name would start a fresh run."""
    words = ["fcn", "train", "--stage", args.stage]
    for option in ("--params", "--run-name", "--trace-dir"):
        dest = option[2:].replace("-", "_")
        if getattr(args, dest) != parser.get_default(dest):
            words += [option, str(getattr(args, dest))]
    return shlex.join(words)


if __name__ == "__main__":
    sys.exit(main())
