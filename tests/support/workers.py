"""Test helpers shared across parts: workers."""
from pipelines.train import loop, recipe
from support.training import make_params

ITERATIONS, VAL_EVERY = 6, 2


def tiny_worker(tmp_path, **train_knobs):
    stages = {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": ITERATIONS}}
    params = make_params(tmp_path, stages, optimizer="sgd", momentum=0.9, val_every=VAL_EVERY, **train_knobs)
    config = loop.stage_config(params, "fcn32s", recipe.resolve_init(params, "fcn32s"))
    return loop.StageWorker(config, "cpu")
