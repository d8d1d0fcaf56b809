"""The `fcn` command.

Each subcommand is an entry point (pipelines/stages/ for the DVC stages,
pipelines/commands/ for the others) with a `main(argv) -> int` that parses its own
arguments, so `fcn fetch ...` and `python -m pipelines.stages.fetch ...` are the same
thing. This is the one module that imports the entry points, and only the one whose
subcommand runs: `fcn summary` must not pay for importing Ray or MLflow.
"""
import importlib
import sys

COMMANDS = {
    "summary": ("fcn_models.summary", "per-layer table of a trunk, and the paper's Table 1"),
    "demo": ("pipelines.commands.demo", "the whole pipeline offline on a generated mirror, one Ray head: make demo"),
    "demo-data": ("pipelines.commands.demo_data", "write a generated VOC2012/SBD-format mirror"),
    "fetch": ("pipelines.stages.fetch", "download, verify and extract VOC2012 and SBD"),
    "preprocess": ("pipelines.stages.preprocess", "convert the raw datasets into Parquet shards"),
    "train": ("pipelines.stages.train", "train one FCN stage on Ray Train"),
    "seeds": ("pipelines.commands.seeds", "train one stage for several seeds: mean ± std of each score"),
    "scaling-study": ("pipelines.commands.scaling_study",
                      "train one stage at several global batches (train.scaling) and seeds: table and curves"),
    "evaluate": ("pipelines.stages.evaluate", "score each trained stage on all of val: the paper's table"),
    "register": ("pipelines.stages.register", "log the best checkpoint to MLflow; move the champion alias if it is better"),
    "predict": ("pipelines.commands.predict", "mask and overlay PNGs for images, from a registered model or a checkpoint"),
    "import": ("pipelines.commands.import_weights", "the reference's caffemodels / pytorch-fcn files as our checkpoints"),
    "standin": ("pipelines.commands.standin",
                "train the ImageNet stand-in: a width-scaled VGG16 classifier on generated pictures"),
    "status": ("pipelines.commands.status", "the stage runs in MLflow; runs whose driver is gone marked FAILED"),
    "predict-batch": ("pipelines.commands.predict_batch",
                      "masks, overlays and class shares for a directory, glob or Parquet of images, on Ray Data"),
    "serve": ("pipelines.commands.serve", "serve a registered model over HTTP on 127.0.0.1 (mlflow models serve)"),
    "ui": ("pipelines.commands.ui", "the MLflow UI over the project's store, on 127.0.0.1; prints where the runs are"),
    "export": ("pipelines.commands.export", "write a checkpoint or registered model as ONNX (dynamic height and width)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: fcn <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`fcn <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fcn: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
