"""What a stage computes in: float16 autocast on a GPU (train.amp), bfloat16 autocast on CPU
cores (train.cpu_amp), float32 otherwise; the network and its inputs in channels-last layout.
Weights, optimizer state and checkpoints stay float32 whatever the autocast."""
import pytest
import torch

from fcn_models.checkpoint import load_checkpoint
from pipelines.train import loop, recipe
from support.training import make_params

STAGES = {"fcn32s": {"init": "imagenet", "lr": 1e-3, "iterations": 2}}
needs_bf16 = pytest.mark.skipif(not loop.cpu_has_bf16(), reason="this CPU has no bfloat16 kernels")


def config(root, optimizer="adam", **train):
    momentum = 0.9 if optimizer == "adam" else 0.99
    params = make_params(root, STAGES, optimizer=optimizer, momentum=momentum, **train)
    return loop.stage_config(params, "fcn32s", recipe.resolve_init(params, "fcn32s"))


def scoring(*workers):
    """The score layer starts at zero, which makes every logit 0 in any precision: give it
    the same random weights in each worker so the outputs depend on the whole network."""
    weight = torch.randn_like(workers[0].net.score_fr.weight, generator=torch.Generator().manual_seed(3)) * 0.5
    with torch.no_grad():
        for worker in workers:
            worker.net.score_fr.weight.copy_(weight)
    return workers


def step(worker, images, labels) -> float:
    torch.manual_seed(7)  # the same dropout masks for every worker's step
    return worker.train_step(images, labels).item()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 40, 48, generator=g), torch.randint(0, 21, (2, 40, 48), generator=g)


def test_each_device_and_switch_picks_its_autocast(tmp_path):
    assert loop.autocast_dtype(config(tmp_path, amp=True), torch.device("cuda")) == torch.float16
    assert loop.autocast_dtype(config(tmp_path, amp=False), torch.device("cuda")) is None
    # train.amp is a GPU switch: it never turns on an autocast on CPU cores.
    assert loop.autocast_dtype(config(tmp_path, amp=True, cpu_amp=False), torch.device("cpu")) is None
    expected = torch.bfloat16 if loop.cpu_has_bf16() else None
    assert loop.autocast_dtype(config(tmp_path, cpu_amp=True), torch.device("cpu")) == expected


def test_a_cpu_without_bfloat16_kernels_trains_in_float32_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    worker = loop.StageWorker(config(tmp_path, cpu_amp=True), "cpu")
    assert not worker.use_amp and worker.amp_dtype == torch.float32
    assert "train.cpu_amp: this CPU has no bfloat16 kernels" in capsys.readouterr().out


def test_the_network_and_its_gradients_are_channels_last(tmp_path):
    worker = loop.StageWorker(config(tmp_path), "cpu")
    convs = [p for p in worker.net.parameters() if p.dim() == 4 and p.requires_grad]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    worker.train_step(*batch())
    assert all(p.grad is None or p.grad.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_channels_last_changes_no_number(tmp_path):
    """The same step on the same weights in both layouts: equal to float32 rounding (SGD,
    whose update is linear in the gradient; Adam's first step is lr times the gradient's sign,
    which rounding can flip where a gradient is next to zero)."""
    worker, plain = scoring(loop.StageWorker(config(tmp_path, "sgd"), "cpu"),
                            loop.StageWorker(config(tmp_path, "sgd"), "cpu"))
    plain.net.to(memory_format=torch.contiguous_format)
    images, labels = batch()
    a, b = step(worker, images, labels), step(plain, images.contiguous(), labels)
    assert a == pytest.approx(b, rel=1e-5)
    for (name, p), q in zip(worker.net.named_parameters(), plain.net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


@needs_bf16
def test_cpu_amp_runs_the_step_in_bfloat16_and_keeps_float32_weights(tmp_path):
    worker, full = scoring(loop.StageWorker(config(tmp_path, cpu_amp=True), "cpu"),
                           loop.StageWorker(config(tmp_path, cpu_amp=False), "cpu"))
    assert worker.use_amp and worker.amp_dtype == torch.bfloat16 and not full.use_amp
    seen = []
    worker.net.score_fr.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    images, labels = batch()
    low, high = step(worker, images, labels), step(full, images, labels)
    assert seen == [torch.bfloat16]
    # bfloat16 keeps 8 bits of mantissa: the losses differ, but only in their third digit or so.
    assert low != high and low == pytest.approx(high, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in worker.net.parameters())
    moments = [v for state in worker.optimizer.state.values() for v in state.values() if v.is_floating_point()]
    assert moments and all(v.dtype == torch.float32 for v in moments)


@needs_bf16
def test_in_loop_validation_runs_under_the_same_autocast_and_checkpoints_stay_float32(tmp_path):
    worker = loop.StageWorker(config(tmp_path, cpu_amp=True), "cpu")
    seen = []
    worker.net.score_fr.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    images, labels = batch(1)
    matrix = worker.validate([(images, labels)])
    assert seen == [torch.bfloat16] and matrix.total == int((labels != 255).sum())
    worker.save(tmp_path / "ckpt", 1, matrix.scores(), matrix)
    saved = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in saved.values() if t.is_floating_point())
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    for (name, p), q in zip(worker.net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
