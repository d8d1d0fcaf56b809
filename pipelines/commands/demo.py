"""`fcn demo` (what `make demo` runs): the whole pipeline, offline, on the generated mirror, on one Ray head.

    fcn demo [--timing reports/demo_timing.json] [-S KEY=VALUE ...]

1. writes the generated VOC/SBD mirror (MIRROR: byte-identical every time, so its md5s
   are those pinned in conf/profile/demo.yaml);
2. starts one local Ray head on 127.0.0.1 that every training stage joins (RAY_ADDRESS),
   so the cluster's start-up is paid once; it ends with this process, however that ends
   (pipelines.train.cluster.connect: the reaper kills what is left by PID); the stages get
   LOCAL_TRAIN_ENV, Ray Train's settings for one machine;
3. runs `dvc exp run -S profile=demo` (DVC composes params.yaml from the profile and runs
   every stage of dvc.yaml that is out of date), passing its output through;
4. shows the metrics, the paper's table (reports/evaluation.md) and the registry's
   decision, and where the time went: per stage, from the time DVC started it to the
   next, and for a training stage its own breakdown (reports/<stage>/timing.json:
   joining Ray, the data's first batch, training, validation, writing its outputs; the
   rest is starting Python, MLflow and Ray Train). The same is written to
   reports/demo_timing.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.core.console import say
from pipelines.core.errors import StageError, UsageError
from pipelines.core.exits import run_main
from pipelines.core.files import write_json
from pipelines.core.params import Params, parse_params
from pipelines.data.synthetic import write_mirror
from pipelines.train import cluster
from pipelines.train.timing import TIMING_FILE, PHASES

PROFILE = "demo"
# The mirror the demo profile's md5s pin (tests/core/test_profiles.py writes it again).
MIRROR_DIR = "data/demo/mirror"
MIRROR = {"n_train": 1000, "n_val": 300, "max_side": 160, "objects": (1, 3), "object_scale": 2.5, "seed": 0}
TIMING_REPORT = "reports/demo_timing.json"
_STAGE_LINE = re.compile(r"Running stage '([^']+)'")
# Ray Train's settings for a stage on the demo's own one-machine head, unless the caller set
# them: no preemption watcher (an actor process a stage that nothing can preempt), and the
# controller polling its worker every half second rather than two, so a stage's start and
# end are noticed sooner (docs/RESULTS.md: where the demo's time goes).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def compose_profile(root: Path, overrides: list[str], profile: str = PROFILE) -> Params:
    """The params a profile and overrides compose to, as DVC will write them into params.yaml."""
    import yaml
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory(prefix="fcn-profile-") as scratch:
        out = Path(scratch) / "params.yaml"
        compose_and_dump(out, str(root / "conf"), None, "config", scratch, [f"profile={profile}", *overrides])
        return parse_params(yaml.safe_load(out.read_text()), f"profile {profile}", root=root)


def run_dvc(root: Path, env: dict, overrides: list[str]) -> list[tuple[str, float]]:
    """Run `dvc exp run -S profile=demo [-S override ...]`, passing its output through;
    return [(stage, seconds from its start to the next stage's or the end)]."""
    starts: list[tuple[str, float]] = []
    command = [sys.executable, "-m", "dvc", "exp", "run", "-S", f"profile={PROFILE}",
               *(word for override in overrides for word in ("-S", override))]
    with subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            match = _STAGE_LINE.search(line)
            if match:
                starts.append((match.group(1), time.perf_counter()))
        code = process.wait()
    end = time.perf_counter()
    if code != 0:
        raise StageError(f"`dvc {' '.join(command[3:])}` failed (exit {code}); its output is above")
    return [(name, (starts[i + 1][1] if i + 1 < len(starts) else end) - at) for i, (name, at) in enumerate(starts)]


def stage_breakdown(reports_dir: Path, stages: list[tuple[str, float]]) -> list[dict]:
    """One entry a stage DVC ran: its seconds, and a training stage's phases from its timing file."""
    rows = []
    for name, seconds in stages:
        row = {"stage": name, "seconds": round(seconds, 1)}
        key = name.split("@", 1)[1] if name.startswith("train@") else None
        timing = reports_dir / key / TIMING_FILE if key else None
        if timing is not None and timing.is_file():
            phases = json.loads(timing.read_text())
            row.update({phase: phases.get(phase) for phase in PHASES})
            # Starting Python, MLflow and Ray Train's controller and workers.
            row["other_s"] = round(seconds - sum(phases.get(p) or 0.0 for p in PHASES), 1)
        rows.append(row)
    return rows


def timing_table(total: float, rows: list[dict]) -> str:
    header = ["stage", "seconds", *PHASES, "other_s"]
    lines = ["| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["stage"], f"{row['seconds']:.1f}"]
        cells += [f"{row[p]:.1f}" if isinstance(row.get(p), (int, float)) else "" for p in (*PHASES, "other_s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nthe whole demo: {total:.0f} s"


def show_results(root: Path, params: Params) -> None:
    reports = [str(path) for path in (Path(params.train.reports_dir) / s / "metrics.json" for s in params.evaluate.stages)
               if path.is_file()]
    subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", *reports], cwd=root, check=False)
    table = Path(params.evaluate.table_file)
    if table.is_file():
        print("\n" + table.read_text())
    registry = Path(params.mlflow.registry_file)
    if registry.is_file():
        r = json.loads(registry.read_text())
        print(f"registry: {r['decision']} version {r['new_version']} | champion: version {r['champion_version']} "
              f"mean IU {r['champion_mean_iu']:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn demo", description=__doc__.split("\n")[0])
    parser.add_argument("--timing", default=TIMING_REPORT, help="where the time breakdown goes (default %(default)s)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override passed on to `dvc exp run -S` (repeatable), e.g. "
                             "train.stages.fcn8s.iterations=2000")
    args = parser.parse_args(argv)

    def body():
        started = time.perf_counter()
        # The project it is run in (make demo: the Makefile's directory).
        root = Path.cwd()
        if not (root / "dvc.yaml").is_file() or not (root / "conf" / "profile" / f"{PROFILE}.yaml").is_file():
            raise UsageError(f"{root} holds no dvc.yaml and conf/profile/{PROFILE}.yaml: run fcn demo in the project's "
                             "root directory (make demo does)")
        params = compose_profile(root, args.overrides)
        say(f"writing the generated mirror into {MIRROR_DIR}")
        write_mirror(root / MIRROR_DIR, **MIRROR)
        mirror_s = time.perf_counter() - started

        # One head for every stage: joined through RAY_ADDRESS, which dvc passes on.
        head_started = time.perf_counter()
        cluster.connect(params.ray)
        import ray

        address = ray.get_runtime_context().gcs_address
        head_s = time.perf_counter() - head_started
        say(f"Ray head on {address} (127.0.0.1 only), joined by every training stage")
        # The stages' `python` is this environment's, as under make demo.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "PATH": path, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1",
               **{k: v for k, v in LOCAL_TRAIN_ENV.items() if k not in os.environ}}
        stages = run_dvc(root, env, args.overrides)
        ray.shutdown()

        print()
        show_results(root, params)
        total = time.perf_counter() - started
        rows = [{"stage": "mirror", "seconds": round(mirror_s, 1)}, {"stage": "ray head", "seconds": round(head_s, 1)},
                *stage_breakdown(Path(params.train.reports_dir), stages)]
        report = {"total_s": round(total, 1), "machine": {"cores": cluster.machine_cores()}, "stages": rows}
        write_json(root / args.timing, report)
        print("\nwhere the time went (seconds; a training stage's phases from reports/<stage>/timing.json):\n")
        print(timing_table(total, rows))
        print(f"\n(also in {args.timing})")
        print("MLflow UI (runs, registered model): make mlflow-ui (it prints the addresses to open)")
        print("Share the run: git add dvc.lock params.yaml && git commit, then dvc push (docs/TRACKING.md)")

    return run_main("demo", body, resume="run `make demo` again: DVC re-runs only what is out of date")


if __name__ == "__main__":
    sys.exit(main())
