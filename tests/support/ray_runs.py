"""Test helpers shared across parts: what Ray Train recorded of a run in its storage."""
import json
from pathlib import Path


def _snapshot(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def registered_iteration(run_dir: Path) -> int | None:
    """The iteration of the newest checkpoint Ray Train's controller has registered, from the
    snapshot it writes when it takes in a report; a run restored from storage resumes from it.
    None: none registered yet, or the file is being rewritten.

    A worker's `ray.train.report` returns (and its checkpoint directory exists) before the
    controller takes the report in on its next poll, so a checkpoint a worker reported, or one
    on disk, is not necessarily registered when a worker or node dies."""
    try:
        return _snapshot(run_dir)["latest_checkpoint_result"]["metrics"]["iteration"]
    except (KeyError, TypeError):
        return None


def registered_iterations(run_dir: Path) -> list[int]:
    """The iterations of the checkpoints Ray Train keeps registered for the run (its
    `checkpoints_to_keep`), each checked to be in the run's storage."""
    results = (_snapshot(run_dir) or {}).get("checkpoint_results", [])
    missing = [r["checkpoint_dir_name"] for r in results if not (run_dir / r["checkpoint_dir_name"]).is_dir()]
    assert not missing, f"registered checkpoints missing from {run_dir}: {missing}"
    return sorted(r["metrics"]["iteration"] for r in results)


def checkpoints_on_disk(run_dir: Path) -> list[int]:
    """The iterations of the checkpoint directories in the run's storage, from the checkpoints
    themselves: the registered ones, and any a worker wrote that its controller never took in."""
    return sorted(json.loads(meta.read_text())["iterations"] for meta in run_dir.glob("checkpoint_*/meta.json"))
