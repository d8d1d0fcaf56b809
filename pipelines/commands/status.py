"""Status: the pipeline's stage runs in MLflow; a run whose driver is gone is marked FAILED first.

    python -m pipelines.commands.status [--params params.yaml]      (or `fcn status`)

A training stage whose driver was killed (kill -9, a machine that went down) cannot
close its MLflow run, which would stay RUNNING. Every training stage start sweeps
such runs (pipelines.track.stage_runs.sweep_lost_runs); this command does the same on its
own, then lists every stage run, newest first: status, stage, when it started, its
MLflow run id, its Ray run and the driver that trained it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.core import driver
from pipelines.core.exits import run_main
from pipelines.core.params import load_params
from pipelines.track import stage_runs, store


def rows(runs) -> list[tuple[str, ...]]:
    out = []
    for run in runs:
        tags = run.data.tags
        record = stage_runs.run_driver(run)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.info.start_time / 1000))
        out.append((run.info.status, tags.get(stage_runs.STAGE_TAG, "?"), started, run.info.run_id,
                    tags.get(stage_runs.RAY_RUN_TAG, "-"),
                    driver.describe(record) if record.get("pid") else "-"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn status", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml",
                        help="params file naming the tracking store (default: %(default)s)")
    args = parser.parse_args(argv)

    def body():
        params = load_params(args.params)
        uri = store.tracking_uri(params)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            print(f"no MLflow store at {uri[len('sqlite:///'):]} yet: no stage has run")
            return
        for lost in stage_runs.sweep_lost_runs(params):
            print(f"marked FAILED: MLflow run {lost['run_id']} ({lost['stage']}): its driver is gone "
                  f"({lost['driver']})")
        table = rows(stage_runs.stage_runs(params))
        if not table:
            print(f"no stage run in experiment {params.mlflow.experiment!r} at {uri}")
            return
        header = ("status", "stage", "started", "MLflow run", "Ray run", "driver")
        widths = [max(len(r[i]) for r in (header, *table)) for i in range(len(header))]
        for row in (header, *table):
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

    return run_main("status", body)


if __name__ == "__main__":
    sys.exit(main())
