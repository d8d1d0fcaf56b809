"""Register stage: the best checkpoint of one stage becomes a version of the registered model.

    python -m pipelines.stages.register [--params params.yaml]        (or `fcn register`)

The checkpoint in <train.models_dir>/<mlflow.register_stage>, with the scores the
evaluate stage gave it (evaluate.report_file, whole val images at full resolution),
is logged to the MLflow run that trained it and registered under mlflow.model_name
(pipelines/registry/publish.py). `--reference NAME` registers a reference model imported with
`fcn import` (<evaluate.references_dir>/NAME, scored by evaluate) as a baseline version. The alias mlflow.alias moves to the new version only if its
mean IU beats the current champion's. The decision, both numbers and the version
numbers go to mlflow.registry_file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.core.exits import run_main
from pipelines.core.files import atomic_write_text
from pipelines.core.params import load_params, project_dir
from pipelines.registry.publish import evaluated_scores, register
from pipelines.track.val_scores import reference_key


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn register", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml",
                        help="params file; relative paths are taken from its directory (default: %(default)s)")
    parser.add_argument("--reference", metavar="NAME", default=None,
                        help="register the reference model imported into <evaluate.references_dir>/NAME instead "
                             "(a baseline version, through the same gate: run `fcn evaluate` first)")
    args = parser.parse_args(argv)

    def body():
        params = load_params(args.params)
        if args.reference is None:
            stage, remake = params.mlflow.register_stage, None
            checkpoint = Path(params.train.models_dir) / stage
        else:
            stage = reference_key(args.reference)
            checkpoint = Path(params.evaluate.references_dir) / args.reference
            remake = f"import it first (`fcn import SOURCE --out {checkpoint}`)"
        record = register(params, stage, checkpoint, evaluated_scores(params, stage, checkpoint, remake),
                          project_dir(args.params))
        atomic_write_text(Path(params.mlflow.registry_file), json.dumps(record, indent=2) + "\n")
        before = ("no champion before" if record["champion_version_before"] is None else
                  f"champion was version {record['champion_version_before']} "
                  f"(mean IU {record['champion_mean_iu_before']:.4f})")
        print(f"[register] {record['model_name']} version {record['new_version']} "
              f"(mean IU {record['new_mean_iu']:.4f}), {before}: {record['decision']}; "
              f"{record['alias']} -> version {record['champion_version']}", flush=True)

    return run_main("register", body)


if __name__ == "__main__":
    sys.exit(main())
