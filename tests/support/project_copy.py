"""A copy of the project's files for an end-to-end test to run in (never the real checkout)."""
import shutil
from pathlib import Path

from pipelines.core.params import PROJECT_ROOT

# What `dvc repro` of the whole pipeline reads from the checkout: the pipeline, its code and
# profiles, and models/reference (evaluate's dependency, kept in git by its README).
PIPELINE_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "conf", "pipelines", "fcn_models",
                  "models/reference/README.md", "models/standin"]


def copy_project(target: Path, names) -> Path:
    """Copy the named files and directories of the project into target (created), without caches."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target
