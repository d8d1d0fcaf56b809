"""Register stage: the best checkpoint of one stage becomes a version of the registered model.

    python -m pipelines.register [--params params.yaml]        (or `fcn register`)

The checkpoint in <train.models_dir>/<mlflow.register_stage> is logged, inside an
MLflow run in the pipeline's experiment with its val scores as metrics, as a pyfunc
model (pipelines/serving.py, logged as code, with a copy of fcn_models and the
checkpoint): one RGB uint8 image (H, W, 3) of any size in, its (H, W) uint8 mask of
class ids out. It is registered under mlflow.model_name with its val mean IU in the
version tag "mean_iu". The alias mlflow.alias moves to the new version only if that
mean IU beats the one tagged on the version holding the alias now (a tie keeps the
champion; with no champion the new version takes the alias). The decision, both
numbers and the version numbers go to mlflow.registry_file.

The signature takes one image, shape (-1, -1, 3), not a batch (-1, -1, -1, 3): an
FCN takes whole images of any size (the reference scores them one at a time), and
images of different sizes cannot share one array. A batch dimension would serve
only equal-sized images (or ragged object arrays, for which MLflow skips its dtype
check) and make every single image a [None]-wrapped call; with (-1, -1, 3) MLflow
checks rank, channels and dtype of every image of every size.
"""
import argparse
import hashlib
import io
import json
import math
import pickle
import shutil
import sys
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path

import numpy as np

import fcn_models
from fcn_models.checkpoint import META_FILE, MODEL_FILE, read_meta
from pipelines.files import atomic_write_text
from pipelines.params import Params, ParamsError, load_params, resolve
from pipelines.train import SCORE_KEYS

SERVING_CODE = Path(__file__).resolve().with_name("serving.py")
FCN_MODELS_DIR = Path(fcn_models.__file__).resolve().parent
MEAN_IU_TAG = "mean_iu"
# The input example is a val image's centre, at most this many pixels a side:
# it is stored as JSON with the model, twice.
EXAMPLE_MAX_SIDE = 64
# What the logged model needs besides mlflow (which MLflow adds itself).
REQUIREMENTS = ("torch", "torchvision", "numpy")


class RegisterError(RuntimeError):
    """The stage cannot register as configured; the message says what to do."""


def checkpoint_scores(checkpoint: Path) -> dict:
    """The checkpoint's val scores (SCORE_KEYS), checked: mean IU must be a finite number."""
    try:
        meta = read_meta(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise RegisterError(f"{err}; train that stage first (`python -m pipelines.train --stage "
                            f"{checkpoint.name}`) or set mlflow.register_stage") from None
    val = meta.get("val")
    if not isinstance(val, dict) or any(not isinstance(val.get(k), (int, float)) for k in SCORE_KEYS):
        raise RegisterError(f"{checkpoint / META_FILE} has no val scores ({', '.join(SCORE_KEYS)} under \"val\"): "
                            "register takes checkpoints written by the train stage")
    if not math.isfinite(val["mean_iu"]):
        raise RegisterError(f"{checkpoint / META_FILE}: val mean_iu is {val['mean_iu']}, not a number to compare")
    return {k: float(val[k]) for k in SCORE_KEYS}


def example_image(val_dir: Path, max_side: int = EXAMPLE_MAX_SIDE) -> np.ndarray:
    """The val image with the fewest pixels (ties: the smallest id), its centre cut to at most max_side a side."""
    import pyarrow.parquet as pq
    from PIL import Image

    files = sorted(Path(val_dir).glob("part-*.parquet"))
    if not files:
        raise RegisterError(f"{val_dir}: no part-*.parquet shards for the model's input example "
                            "(run `fcn preprocess`, or check data.shards_dir)")
    best = None  # ((pixels, id), file, row)
    for path in files:
        table = pq.read_table(path, columns=["id", "height", "width"]).to_pydict()
        for row, (image_id, height, width) in enumerate(zip(table["id"], table["height"], table["width"])):
            key = (height * width, image_id)
            if best is None or key < best[0]:
                best = (key, path, row)
    if best is None:
        raise RegisterError(f"{val_dir}: the val shards hold no image")
    _, path, row = best
    jpeg = pq.read_table(path, columns=["image"]).column("image")[row].as_py()
    image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    height, width = image.shape[:2]
    cut_h, cut_w = min(height, max_side), min(width, max_side)
    top, left = (height - cut_h) // 2, (width - cut_w) // 2
    return np.ascontiguousarray(image[top:top + cut_h, left:left + cut_w])


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
                          outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1))]))


def requirements() -> list[str]:
    # Local version labels (2.x+cpu) are dropped: the same model serves on a CUDA build.
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in REQUIREMENTS]


def current_champion(client, name: str, alias: str) -> dict | None:
    """{"version", "mean_iu"} of the version holding the alias, read from its tag; None if none holds it."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if alias not in model.aliases:
        return None
    holder = client.get_model_version(name, str(model.aliases[alias]))
    tag = holder.tags.get(MEAN_IU_TAG)
    try:
        mean_iu = float(tag)
    except (TypeError, ValueError):
        mean_iu = math.nan
    if not math.isfinite(mean_iu):
        raise RegisterError(
            f"version {holder.version} of registered model {name!r} holds alias {alias!r} but its tag "
            f"{MEAN_IU_TAG!r} is {tag!r}, not a mean IU to compare with: set the tag to its val mean IU "
            f"(MlflowClient().set_model_version_tag) or remove the alias (delete_registered_model_alias)"
        )
    return {"version": int(holder.version), "mean_iu": mean_iu}


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def register(params: Params, root: Path) -> dict:
    """Log, register and gate the alias; write and return the record (the registry file's content)."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines import tracking
    from pipelines.serving import CHECKPOINT_ARTIFACT, FCNSegmenter

    root = Path(root).resolve()
    config = params.mlflow
    stage = config.register_stage
    checkpoint = resolve(params.train.models_dir, root) / stage
    scores = checkpoint_scores(checkpoint)
    example = example_image(resolve(params.data.shards_dir, root) / "val")
    # Load and run it here: MLflow only warns when its own check of the input example fails.
    try:
        segmenter = FCNSegmenter().load(checkpoint, device="cpu")
        segmenter.segment(example)
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError) as err:
        raise RegisterError(f"{checkpoint}: cannot load and run the checkpoint: {err}") from None
    meta = segmenter.meta

    experiment_id = tracking.set_up(params, root)
    client = MlflowClient()
    champion = current_champion(client, config.model_name, config.alias)
    weights_sha256 = _sha256(checkpoint / MODEL_FILE)
    with tempfile.TemporaryDirectory(prefix="fcn-register-") as scratch:
        # Only the weights and their description travel with the model.
        packed = Path(scratch) / "checkpoint"
        packed.mkdir()
        for name in (MODEL_FILE, META_FILE):
            shutil.copy2(checkpoint / name, packed / name)
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{stage}") as run:
            mlflow.log_params({
                "stage": stage, "variant": meta["variant"], "backbone": meta["backbone"], "width": meta["width"],
                "num_classes": meta["num_classes"], "input_norm": meta["input_norm"]["name"],
                **{k: meta[k] for k in ("iterations", "init") if k in meta},
            })
            mlflow.log_metrics(scores)
            mlflow.set_tag("weights_sha256", weights_sha256)
            commit, dirty = tracking.git_state(root)
            mlflow.set_tags({tracking.GIT_COMMIT_TAG: commit,
                             **({} if dirty is None else {tracking.GIT_DIRTY_TAG: str(dirty).lower()})})
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(SERVING_CODE), code_paths=[str(FCN_MODELS_DIR)],
                artifacts={CHECKPOINT_ARTIFACT: str(packed)}, signature=model_signature(),
                input_example=example, pip_requirements=requirements(),
            )
    # The tags come with the version, so the alias gate never sees a version without its score.
    version = mlflow.register_model(info.model_uri, config.model_name, tags={
        MEAN_IU_TAG: repr(scores["mean_iu"]), "stage": stage, "weights_sha256": weights_sha256,
    })
    new = {"version": int(version.version), "mean_iu": scores["mean_iu"]}
    promote = champion is None or new["mean_iu"] > champion["mean_iu"]
    if promote:
        client.set_registered_model_alias(config.model_name, config.alias, str(new["version"]))
    after = new if promote else champion
    record = {
        "model_name": config.model_name,
        "alias": config.alias,
        "decision": "promoted" if promote else "kept",
        "new_version": new["version"],
        "new_mean_iu": new["mean_iu"],
        "champion_version_before": champion["version"] if champion else None,
        "champion_mean_iu_before": champion["mean_iu"] if champion else None,
        "champion_version": after["version"],
        "champion_mean_iu": after["mean_iu"],
        "stage": stage,
        "checkpoint": _relative(checkpoint, root),
        "run_id": run.info.run_id,
        "model_uri": f"models:/{config.model_name}/{new['version']}",
    }
    atomic_write_text(resolve(config.registry_file, root), json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn register", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml",
                        help="params file; relative paths are taken from its directory (default: %(default)s)")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        params = load_params(args.params)
        record = register(params, Path(args.params).resolve().parent)
    except ParamsError as err:
        print(f"register: {err}", file=sys.stderr)
        return 2
    except (RegisterError, MlflowException) as err:
        print(f"register: {err}", file=sys.stderr)
        return 1
    before = ("no champion before" if record["champion_version_before"] is None else
              f"champion was version {record['champion_version_before']} "
              f"(mean IU {record['champion_mean_iu_before']:.4f})")
    print(f"[register] {record['model_name']} version {record['new_version']} (mean IU {record['new_mean_iu']:.4f}), "
          f"{before}: {record['decision']}; {record['alias']} -> version {record['champion_version']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
