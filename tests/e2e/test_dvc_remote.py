"""A teammate reproduces a run from the DVC remote: push, a fresh clone, pull, nothing to re-run.

The project is copied into a fresh git + DVC repo with the project's .dvc/config,
whose default remote is a directory beside the project (`../../dvc-remote` from the
.dvc directory). A small demo-profile run (`dvc exp run -S profile=demo`, on a
generated mirror, with the overrides that keep it short) is committed and pushed;
then `git clone` beside it, `dvc pull` restores every output (raw tree, shards,
models, reports) from the remote the clone's config names, `dvc status` is clean and
`dvc repro` runs nothing. The clone never sees the generated mirror's archives.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from support.project_copy import PIPELINE_FILES, copy_project

from pipelines.core.params import PROJECT_ROOT
from pipelines.data.synthetic import write_mirror

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "remote test", "GIT_AUTHOR_EMAIL": "remote@example.invalid",
                "GIT_COMMITTER_NAME": "remote test", "GIT_COMMITTER_EMAIL": "remote@example.invalid"}
# The profile's width: the fixed row and FCN-32s start from the shipped stand-in, made at it.
SMALL = ["train.val_every=2", "ray.num_workers=1", "train.stages.fcn32s-fixed.iterations=2",
         "train.stages.fcn32s.iterations=2", "train.stages.fcn16s.iterations=2", "train.stages.fcn8s.iterations=2"]


def _env() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                DVC_NO_ANALYTICS="1", RAY_USAGE_STATS_ENABLED="0", **GIT_IDENTITY)


def _run(cwd: Path, *args: str, timeout: int = 900) -> str:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{output[-6000:]}"
    return output


def _dvc(cwd: Path, *args: str, timeout: int = 900) -> str:
    return _run(cwd, sys.executable, "-m", "dvc", *args, timeout=timeout)


def outputs(repo: Path) -> dict[str, str]:
    """{path: sha256} of every file of every output dvc.lock records, relative to the repo."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    paths = [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]
    found = {}
    for path in paths:
        target = repo / path
        files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        assert files, f"{path}: no files"
        found.update({str(f.relative_to(repo)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
    return found


def test_a_clone_pulls_every_output_and_has_nothing_to_rerun(tmp_path):
    mirror = write_mirror(tmp_path / "mirror", n_train=8, n_val=4, seed=5, max_side=48, workers=1)
    work = tmp_path / "work"
    repo, clone, remote = work / "repo", work / "clone", work / "dvc-remote"
    copy_project(repo, PIPELINE_FILES)
    _run(repo, "git", "init", "-q")
    _dvc(repo, "init", "-q")
    shutil.copy2(PROJECT_ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    assert "local" in _dvc(repo, "remote", "list") and str(remote) in _dvc(repo, "remote", "list")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "project")

    overrides = [f"data.local_dir={mirror['voc'].parent}", f"data.voc.md5={mirror['md5']['voc']}",
                 f"data.sbd.md5={mirror['md5']['sbd']}", *SMALL]
    ran = _dvc(repo, "exp", "run", "-S", "profile=demo", *(a for o in overrides for a in ("-S", o)))
    assert "Running stage 'register'" in ran
    # What a teammate gets: the run's lock and params in git, its outputs in the remote.
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "demo run")
    pushed = outputs(repo)
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"fetch", "preprocess", "train@fcn32s-fixed", "train@fcn32s", "train@fcn16s", "train@fcn8s", "evaluate",
            "register"} <= set(stages)
    assert any(path.startswith("data/demo/shards/") for path in pushed)
    assert {"models/fcn8s/model.pt", "reports/evaluation.json", "reports/registry.json"} <= set(pushed)
    _dvc(repo, "push")
    assert "Cache and remote 'local' are in sync" in _dvc(repo, "status", "--cloud")
    assert any((remote / "files" / "md5").rglob("*")), "nothing in the remote"

    _run(work, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models" / "fcn8s").exists() and not (clone / "data" / "demo").exists()
    _dvc(clone, "pull")
    assert outputs(clone) == pushed
    assert json.loads((clone / "reports" / "registry.json").read_text()) == \
        json.loads((repo / "reports" / "registry.json").read_text())
    assert "Data and pipelines are up to date" in _dvc(clone, "status")
    again = _dvc(clone, "repro")
    assert "Running stage" not in again, again[-3000:]
    # The clone needed nothing but the remote: the mirror's archives could be gone.
    assert not (clone / "data" / "demo" / "downloads").exists()
