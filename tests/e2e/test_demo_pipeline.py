"""The demo profile end to end through DVC: fetch -> preprocess -> train@fcn32s -> fcn16s -> fcn8s
-> evaluate -> register, then the MLflow UI's REST API over the store the run wrote.

The project is copied into a fresh git + DVC repo in a temp dir (DVC never runs in
the real checkout), committed, and run as `make demo` runs it, with `dvc exp run -S
profile=demo`, plus overrides that make it small: a smaller generated mirror (its
md5s passed in), a narrower network, a few iterations, one Ray worker. Then: every
stage's outputs exist and agree with each other, a second `dvc repro` runs nothing,
a new FCN-16s learning rate re-runs FCN-16s, FCN-8s and what follows them, and the
MLflow server shows the experiment's runs and the registered FCN-8s with its alias.
"""
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch
import yaml
from support.project_copy import PIPELINE_FILES, copy_project

from fcn_models.checkpoint import load_checkpoint
from pipelines.core.params import PROJECT_ROOT, load_params
from pipelines.data.synthetic import write_mirror
from pipelines.train import scaling

STAGES = ("fcn32s-fixed", "fcn32s", "fcn16s", "fcn8s")
PIPELINE = ("fetch", "preprocess", *(f"train@{s}" for s in STAGES), "evaluate", "register")
# Images a stage sees (the params' iterations: train.scaling derives the steps from them).
ITERATIONS = {"fcn32s-fixed": 8, "fcn32s": 16, "fcn16s": 8, "fcn8s": 8}
VAL_EVERY = 8
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "demo test", "GIT_AUTHOR_EMAIL": "demo@example.invalid",
                "GIT_COMMITTER_NAME": "demo test", "GIT_COMMITTER_EMAIL": "demo@example.invalid"}


def _env() -> dict:
    # The stage commands run `python`: the venv's, first on PATH.
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                DVC_NO_ANALYTICS="1", **GIT_IDENTITY)


def _run(repo: Path, *args: str, timeout: int = 600) -> str:
    result = subprocess.run(args, cwd=repo, env=_env(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-6000:]}"
    return output


def _dvc(repo: Path, *args: str, timeout: int = 600) -> str:
    return _run(repo, sys.executable, "-m", "dvc", *args, timeout=timeout)


def _make_repo(repo: Path) -> None:
    copy_project(repo, PIPELINE_FILES)
    _run(repo, "git", "init", "-q")
    _dvc(repo, "init", "-q")
    # The project's DVC config: Hydra composition on, no analytics.
    shutil.copy2(PROJECT_ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "project")


def test_demo_profile_runs_every_stage_and_reruns_only_what_changed(tmp_path):
    mirror = write_mirror(tmp_path / "mirror", n_train=16, n_val=6, seed=3, max_side=64, workers=1)
    repo = tmp_path / "repo"
    _make_repo(repo)

    smaller = [
        f"data.local_dir={mirror['voc'].parent}",
        f"data.voc.md5={mirror['md5']['voc']}",
        f"data.sbd.md5={mirror['md5']['sbd']}",
        f"train.val_every={VAL_EVERY}",
        "augment.crop_size=64",
        "ray.num_workers=1",
        *(f"train.stages.{s}.iterations={n}" for s, n in ITERATIONS.items()),
    ]
    # As make demo runs it: one Ray head for every stage, then the table and the timing.
    first = _run(repo, str(Path(sys.executable).parent / "fcn"), "demo", *(a for o in smaller for a in ("-S", o)),
                 timeout=1200)
    for stage in PIPELINE:
        assert f"Running stage '{stage}'" in first, stage
    assert first.count("Started a local Ray instance") == 1
    # Ray Train's preemption watcher (an actor process a stage, which logs its start) is off
    # on the demo's own head.
    assert "PreemptionWatcher" not in first
    timing = json.loads((repo / "reports" / "demo_timing.json").read_text())
    assert [row["stage"] for row in timing["stages"]] == ["mirror", "ray head", *PIPELINE]
    for row in timing["stages"]:
        assert row["seconds"] >= 0, row
        if row["stage"].startswith("train@"):
            phases = [row[p] for p in ("join_ray_s", "data_start_s", "train_s", "val_s", "outputs_s")]
            assert all(p >= 0 for p in phases) and row["train_s"] > 0 and row["val_s"] > 0, row
            # A stage's phases fit in its wall time (it also starts Python, Ray Train and MLflow).
            assert sum(phases) <= row["seconds"] + 1, row
    assert timing["total_s"] >= sum(row["seconds"] for row in timing["stages"]) - 1

    # params.yaml is the demo profile, composed, with the overrides on top.
    params = load_params(repo / "params.yaml")
    demo = yaml.safe_load((PROJECT_ROOT / "conf" / "profile" / "demo.yaml").read_text())
    assert params.train.loss == demo["train"]["loss"] and params.model.width == demo["model"]["width"]
    assert params.data.shards_dir == str(repo / demo["data"]["shards_dir"])

    for stage in STAGES:
        model, meta = load_checkpoint(repo / "models" / stage)
        assert model.variant == stage.removesuffix("-fixed") and model.width == params.model.width
        metrics = json.loads((repo / "reports" / stage / "metrics.json").read_text())
        # The demo's batch: the steps and validations that see the images asked for.
        derived = scaling.for_stage(params, stage)
        batch = params.train.batch_size * params.ray.num_workers
        assert derived.global_batch == batch and derived.rule == params.train.scaling
        steps, every = derived.iterations, derived.val_every
        assert steps * batch >= ITERATIONS[stage] > (steps - 1) * batch
        assert metrics["iterations"] == steps
        assert 0.0 <= metrics["mean_iu"] <= metrics["pixel_acc"] <= 1.0
        with open(repo / "reports" / stage / "history.csv") as fh:
            history = list(csv.DictReader(fh))
        # Validated every val_every images (in steps) and at the end.
        expected = sorted({*range(every, steps + 1, every), steps})
        assert [int(row["iteration"]) for row in history] == expected
        best = max(history, key=lambda row: float(row["mean_iu"]))
        assert abs(float(best["mean_iu"]) - metrics["mean_iu"]) < 1e-9
        assert meta["val"]["mean_iu"] == metrics["mean_iu"]
    # Each stage starts from the one before; FCN-32s and the fixed row from the shipped stand-in.
    for stage in ("fcn32s-fixed", "fcn32s"):
        init = json.loads((repo / "reports" / stage / "metrics.json").read_text())["init"]
        assert init == f"imagenet ({repo / demo['model']['imagenet_weights']})", stage
    # The fixed row learned its score layer only: its trunk is the stand-in's, fc7 included.
    fixed = torch.load(repo / "models" / "fcn32s-fixed" / "model.pt", weights_only=True)
    standin = torch.load(repo / demo["model"]["imagenet_weights"], weights_only=True)
    assert torch.equal(fixed["trunk.fc7.weight"].flatten(1), standin["classifier.3.weight"].float())
    assert json.loads((repo / "reports" / "fcn16s" / "metrics.json").read_text())["init"].startswith("fcn32s")
    assert json.loads((repo / "reports" / "fcn8s" / "metrics.json").read_text())["init"].startswith("fcn16s")
    # FCN-16s's trunk is FCN-32s's weights moved on by training, not a fresh net.
    state32 = torch.load(repo / "models" / "fcn32s" / "model.pt", weights_only=True)
    state16 = torch.load(repo / "models" / "fcn16s" / "model.pt", weights_only=True)
    assert state32["trunk.conv1_1.weight"].shape == state16["trunk.conv1_1.weight"].shape

    # evaluate: every stage's best checkpoint on all of val, the same scores as training's
    # last word on it (both score whole val images at their own sizes).
    evaluation = json.loads((repo / "reports" / "evaluation.json").read_text())
    assert list(evaluation) == list(STAGES)
    for stage in STAGES:
        metrics = json.loads((repo / "reports" / stage / "metrics.json").read_text())
        assert abs(evaluation[stage]["mean_iu"] - metrics["mean_iu"]) < 1e-6, stage
        assert evaluation[stage]["forward_ms"] > 0
    # The paper's Figure 4 and the chain's learning curves.
    for figure in ("figure4.png", "learning_curves.png"):
        assert (repo / "reports" / "figures" / figure).stat().st_size > 0, figure
    table = (repo / "reports" / "evaluation.md").read_text()
    # Our rows, each followed by the paper's own as a reminder of what the full run aims for.
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| FCN-")]
    assert [row for row in rows if "the paper" not in row] == ["FCN-32s-fixed", "FCN-32s", "FCN-16s", "FCN-8s"]
    assert [row for row in rows if "the paper" in row] == \
        [f"{name}: the paper, Table 3" for name in ("FCN-32s-fixed", "FCN-32s", "FCN-16s", "FCN-8s")]

    # register: the first version of the model takes the alias.
    registry = json.loads((repo / "reports" / "registry.json").read_text())
    assert registry["decision"] == "promoted" and registry["champion_version_before"] is None
    assert registry["champion_version"] == registry["new_version"]
    # The gate compares evaluate's scores, and the version comes from the run that trained FCN-8s.
    assert registry["champion_mean_iu"] == evaluation["fcn8s"]["mean_iu"]
    fcn8s_meta = json.loads((repo / "models" / "fcn8s" / "meta.json").read_text())
    assert registry["run_id"] == fcn8s_meta["mlflow_run_id"] == evaluation["fcn8s"]["mlflow_run_id"]

    again = _dvc(repo, "repro")
    assert "Running stage" not in again
    assert "up to date" in _dvc(repo, "status")

    # A new FCN-16s learning rate: `dvc status` names FCN-16s alone (nothing upstream of
    # it, nor FCN-32s beside it); FCN-8s and what follows it run once FCN-16s's model changes.
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["train"]["stages"]["fcn16s"]["lr"] *= 2
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert sorted(json.loads(_dvc(repo, "status", "--json"))) == ["train@fcn16s"]
    rerun = _dvc(repo, "repro")
    ran = sorted(line.split("'")[1] for line in rerun.splitlines() if line.startswith("Running stage '"))
    assert ran == ["evaluate", "register", "train@fcn16s", "train@fcn8s"]
    assert "up to date" in _dvc(repo, "status")
    second = json.loads((repo / "reports" / "registry.json").read_text())
    assert second["new_version"] == registry["new_version"] + 1
    assert second["champion_version_before"] == registry["new_version"]

    check_mlflow_ui(repo, second)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(base: str, path: str, **query) -> dict:
    with urllib.request.urlopen(f"{base}{path}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.loads(response.read())


def _post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def check_mlflow_ui(repo: Path, registry: dict) -> None:
    """The MLflow UI (its server, on 127.0.0.1) over the demo's store: one run per training
    stage in the pipeline's experiment, and the registered FCN-8s with its champion alias."""
    params = load_params(repo / "params.yaml")
    port = _free_port()
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
         f"sqlite:///{repo / params.mlflow.db_file}", "--host", "127.0.0.1", "--port", str(port)],
        cwd=repo, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                experiment = _get(base, "/experiments/get-by-name",
                                  experiment_name=params.mlflow.experiment)["experiment"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, f"mlflow ui exited:\n{server.stderr.read()[-3000:]}"
                assert time.monotonic() < deadline, "mlflow ui did not answer within 120 s"
                time.sleep(1)

        runs = _post(base, "/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                             "max_results": 100})["runs"]
        by_stage = {}
        for run in runs:
            tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            if "fcn.stage" in tags:
                by_stage.setdefault(tags["fcn.stage"], []).append(run)
        # FCN-16s and FCN-8s ran twice with different params: a run each time.
        assert sorted((stage, len(found)) for stage, found in by_stage.items()) == \
            [("fcn16s", 2), ("fcn32s", 1), ("fcn32s-fixed", 1), ("fcn8s", 2)]
        # Each nested under the run that trained the weights it started from: one tree per model.
        ids = {stage: {r["info"]["run_id"] for r in found} for stage, found in by_stage.items()}
        for stage, parent in (("fcn16s", "fcn32s"), ("fcn8s", "fcn16s")):
            for run in by_stage[stage]:
                tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
                assert tags["mlflow.parentRunId"] in ids[parent], stage

        model = _get(base, "/registered-models/get", name=params.mlflow.model_name)["registered_model"]
        aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
        assert aliases == {params.mlflow.alias: str(registry["champion_version"])}
        champion = _get(base, "/registered-models/alias", name=params.mlflow.model_name,
                        alias=params.mlflow.alias)["model_version"]
        assert champion["version"] == str(registry["champion_version"])
        run = _get(base, "/runs/get", run_id=champion["run_id"])["run"]
        # The champion's source run trained it: an FCN-8s run holding evaluate's scores.
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        assert tags["fcn.stage"] == "fcn8s"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert abs(metrics["eval/mean_iu"] - registry["champion_mean_iu"]) < 1e-9
        for key in ("pixel_acc", "mean_acc", "fw_iu"):
            assert 0.0 <= metrics[key] <= 1.0 and 0.0 <= metrics[f"eval/{key}"] <= 1.0, key
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
