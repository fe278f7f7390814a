"""What the update benchmarks time: torch.optim's steps and shardopt's update over fresh parameters."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

import shardopt

KEYWORDS: dict[str, dict[str, Any]] = {"SGD": {"momentum": 0.9}}  # SGD without momentum has no state


def bytes_per_element(optimizer: torch.optim.Optimizer) -> int:
    """What one update must move per parameter element: read param, grad and every
    element-wise state tensor; write param and state back."""
    state = next(iter(optimizer.state_dict()["state"].values()), {})
    tensors = sum(1 for value in state.values() if value.dim() > 0)
    return 4 * (2 + 1 + 2 * tensors)


def make_params(numel: int, tensors: int) -> list[torch.nn.Parameter]:
    size = numel // tensors
    return [torch.nn.Parameter(torch.randn(size)) for _ in range(tensors)]


def torch_step(torch_class: type, numel: int, tensors: int, impl: str) -> Callable[[], Any]:
    """The step of a torch.optim ``impl`` ("forloop", "foreach", "fused") over fresh parameters."""
    params = make_params(numel, tensors)
    options = {"foreach": impl == "foreach"} if impl != "fused" else {"fused": True}
    optimizer = torch_class(params, lr=1e-4, **KEYWORDS.get(torch_class.__name__, {}), **options)
    for p in params:
        p.grad = torch.randn_like(p)
    return optimizer.step


def shardopt_steps(torch_class: type, numel: int, tensors: int) -> tuple[Callable[[], Any], Callable[[], Any], int]:
    """(the update alone, the whole step(), bytes per element) of shardopt at N=1 over fresh parameters."""
    params = make_params(numel, tensors)
    optimizer = shardopt.ShardedOptimizer(params, torch_class, lr=1e-4, **KEYWORDS.get(torch_class.__name__, {}))
    grads = [torch.randn_like(p) for p in params]

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()

    step()
    return (lambda: time_update(optimizer)), step, bytes_per_element(optimizer)


def time_update(optimizer: shardopt.ShardedOptimizer) -> None:
    """The update alone: every buffer's shard, as step() runs it, without the collectives and without
    the copies between the parameters and the shard (on weights read from them once)."""
    weights = _weights.get(optimizer)
    if weights is None:
        weights = _weights[optimizer] = [
            b.master if b.master is not None else b.read_shard(b.new_shard()) for b in optimizer.buffers
        ]
    works = []
    for buffer, shard in zip(optimizer.buffers, weights):
        # Stage 2 keeps its gradient shard; stage 1 the full gradient, of which the shard is a slice.
        grad = buffer.grad_shard if buffer.grad_shard is not None else buffer.full_grad[buffer.shard.slice]
        works += optimizer._plan(buffer, shard, grad, torch.ones(len(buffer.params), dtype=torch.bool))
    optimizer._run(works)


_weights: weakref.WeakKeyDictionary[shardopt.ShardedOptimizer, list[torch.Tensor]] = weakref.WeakKeyDictionary()
