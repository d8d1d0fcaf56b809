"""The fetch -> preprocess DVC pipeline, run by DVC itself on a small generated mirror.

Only these two stages are run and checked (`dvc repro preprocess` and `dvc status
preprocess` cover a stage and everything upstream of it); the training stages that
follow them in dvc.yaml are left alone.

The project's dvc.yaml, params.yaml and code are copied into a fresh git + DVC repo in
a temp dir; the stage commands (`python -m pipelines.stages.<stage>`) then import the copied
modules, and `python` is the venv's, first on PATH.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from support.project_copy import copy_project

from pipelines.core.params import PROJECT_ROOT, load_params
from pipelines.data.synthetic import write_mirror

COPIED = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pipelines", "fcn_models"]


def _dvc(repo: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               DVC_NO_ANALYTICS="1")
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{output}"
    return output


def _set_params(repo: Path, **data) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["data"].update(data)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(path)  # still valid


def test_dvc_repro_runs_what_changed_and_nothing_else(tmp_path):
    mirror = write_mirror(tmp_path / "mirror", n_train=12, n_val=6, seed=1, max_side=64, workers=1)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    copy_project(repo, COPIED)
    _dvc(repo, "init", "-q")
    shutil.copy2(PROJECT_ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    _set_params(repo, local_dir=str(mirror["voc"].parent), workers=2,
                voc={"filename": mirror["voc"].name, "md5": mirror["md5"]["voc"], "mirrors": []},
                sbd={"filename": mirror["sbd"].name, "md5": mirror["md5"]["sbd"], "mirrors": []})

    first = _dvc(repo, "repro", "preprocess")
    assert "Running stage 'fetch'" in first and "Running stage 'preprocess'" in first
    assert (repo / "data" / "raw" / "VOCdevkit" / "VOC2012" / "JPEGImages").is_dir()
    assert pq.read_table(repo / "data" / "shards" / "train").num_rows == 12
    assert pq.read_table(repo / "data" / "shards" / "val").num_rows == 6
    assert (repo / "data" / "stats.json").is_file() and (repo / "data" / "rejected.json").is_file()
    assert (repo / "dvc.lock").is_file()
    assert "up to date" in _dvc(repo, "status", "preprocess")

    again = _dvc(repo, "repro", "preprocess")
    assert "Running stage" not in again
    assert "Stage 'fetch' didn't change, skipping" in again
    assert "Stage 'preprocess' didn't change, skipping" in again

    # where the archives come from and how many workers run change nothing downstream
    _set_params(repo, workers=1, timeout_s=5.0,
                voc={"filename": mirror["voc"].name, "md5": mirror["md5"]["voc"],
                     "mirrors": ["http://127.0.0.1:9/VOCtrainval_11-May-2012.tar"]})
    assert "up to date" in _dvc(repo, "status", "preprocess")

    # a smaller shard bound re-runs preprocess only
    _set_params(repo, shard_max_bytes=4096)
    status = _dvc(repo, "status", "preprocess")
    assert "preprocess" in status and "data.shard_max_bytes" in status and "fetch" not in status
    third = _dvc(repo, "repro", "preprocess")
    assert "Stage 'fetch' didn't change, skipping" in third
    assert "Running stage 'preprocess'" in third
    assert len(list((repo / "data" / "shards" / "train").glob("part-*.parquet"))) > 1
    assert pq.read_table(repo / "data" / "shards" / "train").num_rows == 12
    assert "up to date" in _dvc(repo, "status", "preprocess")
