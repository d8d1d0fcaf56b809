"""Subnormal floats set to zero, where a CPU would crawl over them.

A float32 smaller in magnitude than 1.18e-38 is subnormal. x86 CPUs compute with such
numbers many times slower than with normal ones, and a network holding them is slow in
every convolution that reads them: in training, and in every forward pass of the
checkpoint it is saved as. Adam with L2 weight decay drives weights that get no gradient
(and their moments) down into that range. torch.set_flush_denormal(True) only sets the
calling thread's flag, not that of the intra-op threads that run the convolutions, so
the numbers themselves are zeroed: after an optimizer step (weights and optimizer
state) and when a checkpoint is loaded. Their values are below anything a float32
result can resolve against a normal weight, so zeroing them changes no score.

    flush_(tensors)             zero the subnormal entries of CPU floating-point tensors
    flush_module_(module)       ... of a module's parameters and buffers
    flush_optimizer_(optimizer) ... of an optimizer's state (momentum, Adam's moments)
    count(tensors)              how many subnormal entries they hold
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def _floats(tensors: Iterable) -> list[torch.Tensor]:
    # GPUs compute with subnormals at full speed: only CPU tensors pay for them.
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == "cpu"]


@torch.no_grad()
def flush_(tensors: Iterable) -> None:
    """Set every subnormal entry of the CPU floating-point tensors to zero, in place."""
    for t in _floats(tensors):
        t.masked_fill_(t.abs() < torch.finfo(t.dtype).tiny, 0)


def flush_module_(module: nn.Module) -> nn.Module:
    flush_([*module.parameters(), *module.buffers()])
    return module


def flush_optimizer_(optimizer: torch.optim.Optimizer) -> None:
    flush_(value for state in optimizer.state.values() for value in state.values())


@torch.no_grad()
def count(tensors: Iterable) -> int:
    """The number of subnormal entries (non-zero, below the smallest normal) in the tensors."""
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            magnitude = t.detach().abs()
            total += int(((magnitude > 0) & (magnitude < torch.finfo(t.dtype).tiny)).sum())
    return total
