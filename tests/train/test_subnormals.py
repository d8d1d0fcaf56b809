"""Subnormal floats never stay in a network the project trains or loads on a CPU.

Adam with L2 weight decay drives weights that get no gradient, and their moments, below
float32's smallest normal number (1.18e-38), where a CPU computes many times slower: a
stage slowed down fourfold as it went. These tests plant such values and check that a
training step and a checkpoint load leave none (the speed itself is bench/bench_subnormals.py's).
"""
import torch

from fcn_models import subnormals
from fcn_models.checkpoint import load_checkpoint, save_checkpoint
from fcn_models.fcn import build_fcn
from pipelines.train import loop, recipe
from support.training import WIDTH, make_params

SUBNORMAL = 1e-39  # below torch.finfo(torch.float32).tiny


def plant(tensor: torch.Tensor, every: int = 7) -> int:
    """Set every `every`-th entry (in memory order, whatever the layout) to a subnormal; return how many."""
    with torch.no_grad():
        flat = tensor.as_strided((tensor.numel(),), (1,))
        flat[::every] = SUBNORMAL
    return len(range(0, flat.numel(), every))


def test_count_sees_subnormals_and_flush_zeroes_only_them():
    tiny = torch.finfo(torch.float32).tiny
    t = torch.tensor([SUBNORMAL, -SUBNORMAL, 0.0, 1e-30, -2.0, tiny])
    kept = t[3:].clone()
    assert subnormals.count([t]) == 2
    subnormals.flush_([t])
    assert t[:3].tolist() == [0.0, 0.0, 0.0] and torch.equal(t[3:], kept)


def test_training_zeroes_subnormal_weights_and_optimizer_state_every_few_steps(tmp_path):
    stages = {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 2}}
    params = make_params(tmp_path, stages, optimizer="adam", momentum=0.9, weight_decay=5e-4)
    worker = loop.StageWorker(loop.stage_config(params, "fcn32s", recipe.resolve_init(params, "fcn32s")), "cpu")
    planted = sum(plant(p) for name, p in worker.net.named_parameters() if p.requires_grad and p.dim() == 4)
    assert subnormals.count(worker.net.parameters()) == planted > 1000
    images = torch.randn(1, 3, 40, 48)
    labels = torch.randint(0, 21, (1, 40, 48))
    for step in range(1, loop.FLUSH_EVERY + 1):
        worker.train_step(images, labels)
        assert worker.last_step_finite
        if step < loop.FLUSH_EVERY:
            # Between flushes they may stay: the flush runs every FLUSH_EVERY steps.
            assert subnormals.count(worker.net.parameters()) > 0
    moments = [v for state in worker.optimizer.state.values() for v in state.values()]
    assert subnormals.count(worker.net.parameters()) == 0
    assert subnormals.count(moments) == 0


def test_a_checkpoint_saved_between_flushes_holds_no_subnormal(tmp_path):
    stages = {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 2}}
    params = make_params(tmp_path, stages, optimizer="adam", momentum=0.9, weight_decay=5e-4)
    worker = loop.StageWorker(loop.stage_config(params, "fcn32s", recipe.resolve_init(params, "fcn32s")), "cpu")
    worker.train_step(torch.randn(1, 3, 40, 48), torch.randint(0, 21, (1, 40, 48)))
    planted = sum(plant(p) for p in worker.net.parameters() if p.requires_grad and p.dim() == 4)
    assert planted > 1000
    matrix = worker.validate([(torch.randn(1, 3, 40, 48), torch.randint(0, 21, (1, 40, 48)))])
    worker.save(tmp_path / "ckpt", 1, matrix.scores(), matrix)
    saved = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert subnormals.count(saved.values()) == 0
    state = torch.load(tmp_path / "ckpt" / loop.TRAIN_STATE_FILE, weights_only=True)
    assert subnormals.count(v for s in state["optimizer"]["state"].values() for v in s.values()) == 0


def test_a_checkpoint_with_subnormal_weights_loads_without_them(tmp_path):
    model = build_fcn("fcn8s", width=WIDTH)
    planted = sum(plant(p) for p in model.parameters() if p.dim() == 4)
    save_checkpoint(tmp_path / "ckpt", model, {"stage": "fcn8s"})
    saved = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert subnormals.count(saved.values()) == planted
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert subnormals.count(loaded.parameters()) == 0
    # Nothing else moved.
    for name, value in loaded.state_dict().items():
        expected = saved[name].masked_fill(saved[name].abs() < torch.finfo(torch.float32).tiny, 0)
        assert torch.equal(value, expected), name
