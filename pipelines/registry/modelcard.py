"""What a user reads about the model in MLflow: the model card, the registered model's and
the experiment's descriptions, as Markdown.

    version_card(facts)                 one version: network, weights, lineage, data, scores, input, use
    model_description(name, alias)      the registered model: what it is, what the alias means, how to call it
    experiment_description(params)      the pipeline's experiment: what its runs are
    data_origin(params)                 the archives the shards came from, and whether they are the official ones

`facts` is plain data the register stage gathers (pipelines/registry/publish.py); nothing here
talks to MLflow.
"""
from __future__ import annotations

from fcn_models.metrics import SCORE_HEADINGS, SCORE_KEYS
from fcn_models.published import NAMES
from fcn_models.voc import class_names
from pipelines.core.params import DataParams, Params
from pipelines.serve.model_source import alias_uri

INPUT_TEXT = ("One RGB image as an (H, W, 3) array of uint8 pixel values 0..255, any height and width "
              "(as JSON for the scoring server: `{\"inputs\": [[[r, g, b], ...], ...]}` of integers). Out: an "
              "(H, W) uint8 mask of class ids (the order of the class list above). The input normalisation "
              "is inside the model. Floats (an image scaled to 0..1), RGBA, grayscale and batches of images "
              "are refused with a message saying what to send (HTTP 400 from `fcn serve`).")


def data_origin(params: Params) -> str:
    """Which archives the shards were made from, and whether their md5s are the official releases'."""
    data, official = params.data, DataParams()
    archives = f"{data.voc.filename} (md5 {data.voc.md5}) and {data.sbd.filename} (md5 {data.sbd.md5})"
    if (data.voc.md5, data.sbd.md5) == (official.voc.md5, official.sbd.md5):
        return f"PASCAL VOC 2012 and SBD, the official archives {archives}"
    return (f"archives {archives}, not the official releases: the generated VOC/SBD-format mirror of "
            "`fcn demo-data` (synthetic shapes, one per VOC class), or another copy")


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _scores_table(evaluation: dict, stage: str) -> list[str]:
    lines = ["| stage | " + " | ".join(SCORE_HEADINGS[k] for k in SCORE_KEYS) + " |",
             "|:--|" + "--:|" * len(SCORE_KEYS)]
    for name, entry in evaluation.items():
        label = f"**{name}** (this version)" if name == stage else name
        lines.append(f"| {label} | " + " | ".join(_percent(entry.get(k)) for k in SCORE_KEYS) + " |")
    return lines


def _use(model_uri: str) -> list[str]:
    return [
        "```python",
        "import mlflow, numpy as np",
        "from PIL import Image",
        f'model = mlflow.pyfunc.load_model("{model_uri}")',
        'mask = model.predict(np.asarray(Image.open("photo.jpg").convert("RGB")))   # (H, W) class ids',
        "```",
        "",
        "```",
        f"fcn predict photo.jpg --model {model_uri} --out predictions/     # mask and overlay PNGs",
        f"fcn predict-batch images/ --model {model_uri} --out predictions/ # a directory, on Ray Data",
        f"fcn serve --model {model_uri}                                    # REST: POST /invocations",
        f"fcn export {model_uri} --onnx fcn.onnx                           # ONNX, dynamic height and width",
        "```",
    ]


def version_card(facts: dict) -> str:
    """The model card of one registered version, Markdown.

    facts: model_name, version, stage, meta (the checkpoint's meta.json), weights_sha256,
    run {"name", "id"}, lineage [{"stage", "name", "id"}] (the run's parents, nearest first),
    datasets (provenance.shard_datasets), shards_md5, origin (data_origin), evaluation (the
    evaluate report: {stage: entry}), onnx (the ONNX file's path in the model, or None).
    """
    meta, stage = facts["meta"], facts["stage"]
    names = class_names()[:int(meta["num_classes"])]
    variant = NAMES.get(meta["variant"], meta["variant"])
    uri = f"models:/{facts['model_name']}/{facts['version']}"
    norm = meta["input_norm"]["name"] if isinstance(meta.get("input_norm"), dict) else meta.get("input_norm")
    lines = [
        f"# {facts['model_name']} version {facts['version']}: {variant}, {meta['backbone']} trunk at width "
        f"{meta['width']}",
        "",
        f"A fully convolutional network (Long, Shelhamer and Darrell) for semantic segmentation into "
        f"{len(names)} classes: {', '.join(names)}.",
        "",
        "| | |",
        "|:--|:--|",
        f"| network | {variant} ({meta['variant']}), {meta['backbone']} trunk, width {meta['width']} (1.0 is the "
        f"paper's), {meta['num_classes']} classes, input normalisation {norm} |",
        f"| weights | model.pt sha256 `{facts['weights_sha256']}`: the best checkpoint (iteration "
        f"{meta.get('iterations', '?')}) of stage {stage} |",
        f"| trained in | run `{facts['run']['name']}` ({facts['run']['id']}), its weights started from "
        f"{meta.get('init', 'unknown')} |",
    ]
    if facts.get("lineage"):
        chain = " < ".join(f"`{r['name']}` ({r['stage']}, {r['id']})" for r in facts["lineage"])
        lines.append(f"| lineage | started from {chain} |")
    if facts.get("onnx"):
        lines.append(f"| ONNX | `{facts['onnx']}` in this version's files (`fcn export` writes the same) |")
    lines += [
        "",
        "## Data",
        "",
        f"Trained on the train shards and scored on the val shards (seg11valid), made from {facts['origin']}. "
        f"DVC md5 of the shards directory: `{facts['shards_md5']}`.",
        "",
        "| split | images | by source | DVC md5 of the split |",
        "|:--|--:|:--|:--|",
    ]
    for d in facts["datasets"]:
        sources = ", ".join(f"{k} {v}" for k, v in d["sources"].items())
        lines.append(f"| {d['name']} | {d['rows']} | {sources} | `{d['digest']}` |")
    evaluation = facts["evaluation"]
    lines += ["", "## Scores", "",
              "Evaluate's scores on all of val at each image's own size, in percent (`reports/evaluation.json`):",
              "", *_scores_table(evaluation, stage)]
    per_class = (evaluation.get(stage) or {}).get("per_class_iu") or {}
    if per_class:
        lines += ["", "IU per class of this version:", "", "| class | IU |", "|:--|--:|"]
        lines += [f"| {name} | {_percent(iu)} |" for name, iu in per_class.items()]
    lines += ["", "## Input and output", "", INPUT_TEXT, "", "## Use", "", *_use(uri), ""]
    return "\n".join(lines)


def model_description(name: str, alias: str) -> str:
    """The registered model's description."""
    return "\n".join([
        f"# {name}",
        "",
        "Fully convolutional networks (Long, Shelhamer and Darrell) for semantic segmentation into the 21 PASCAL "
        "VOC classes, each version the best FCN checkpoint of one run of the pipeline's `register` stage, "
        "logged from the training run that produced its weights.",
        "",
        f"Alias `{alias}`: the version with the highest mean IU of evaluate's full-resolution val scores; it "
        "moves only when a new version beats it. Each version's description is its model card (network, "
        "weights hash, lineage, data, scores), also in its files as `model_card.md`.",
        "",
        "## Input and output",
        "",
        INPUT_TEXT,
        "",
        "## Use",
        "",
        *_use(alias_uri(name, alias)),
        "",
    ])


def experiment_description(params: Params) -> str:
    """The pipeline experiment's description."""
    return "\n".join([
        f"# {params.mlflow.experiment}",
        "",
        "The FCN pipeline (`dvc repro`): one run per training stage, FCN-32s > FCN-16s > FCN-8s, each nested "
        "under the run that trained the weights it started from. A run's metrics are `loss` and the four "
        "val scores by iteration (`pixel_acc`, `mean_acc`, `mean_iu`, `fw_iu`), `train_loss`, and evaluate's "
        "full-resolution scores as `eval/*` at the checkpoint's iteration; its inputs are the train and val "
        "shards (DVC md5, rows).",
        "",
        f"Registered model: `{params.mlflow.model_name}`, alias `{params.mlflow.alias}` (under Models), each "
        "version logged from the training run that produced it.",
        "",
    ])
