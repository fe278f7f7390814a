"""Gradient accumulation: ``with opt.no_sync():`` keeps micro-batch gradients local, and the
reduced total equals the gradient of one large batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import shardopt
from shardopt.elements.taken_grad import TakenGrad
from tests.common import assert_trajectories_close, flat_params, loss_of, make_model
from tests.world import run_world

STEPS, MICRO = 3, 3
OPTIONS = {"stage2": {"stage": 2}, "stage1": {"stage": 1}, "many-buckets": {"bucket_cap_mb": 1e-5}}


def sharded_run(options: dict[str, Any], last_outside: bool) -> tuple[list[torch.Tensor], list[bool]]:
    """Micro-batches 0..MICRO-2 inside no_sync; the last one after it (``last_outside``) or inside too."""
    import torch.distributed as dist

    rank = dist.get_rank()
    model = make_model()
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2, **options)
    trajectory, kept_locally = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        with optimizer.no_sync():
            for micro in range(MICRO - 1 if last_outside else MICRO):
                loss_of(model, rank, MICRO * step + micro).backward()
            kept_locally.append(all(p.grad is not None for p in model.parameters()))
        if last_outside:
            loss_of(model, rank, MICRO * step + MICRO - 1).backward()
        optimizer.step()
        trajectory.append(flat_params(model))
    return trajectory, kept_locally


def reference(world_size: int) -> list[torch.Tensor]:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trajectory = []
    for step in range(STEPS):
        optimizer.zero_grad()
        for rank in range(world_size):
            for micro in range(MICRO):
                # Gradients add up over micro-batches and ranks; the reduction takes the mean over ranks.
                (loss_of(model, rank, MICRO * step + micro) / world_size).backward()
        optimizer.step()
        trajectory.append(flat_params(model))
    return trajectory


def both_runs(options: dict[str, Any]) -> dict[bool, tuple[list[torch.Tensor], list[bool]]]:
    return {last_outside: sharded_run(options, last_outside) for last_outside in (True, False)}


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("world_size", [2, 3])
def test_no_sync_accumulates_one_large_batch(world_size: int, options: str) -> None:
    expected = reference(world_size)
    for rank, runs in enumerate(run_world(both_runs, world_size, OPTIONS[options])):
        for last_outside, (trajectory, kept_locally) in runs.items():
            label = f"no_sync N={world_size} {options} {'last outside' if last_outside else 'all inside'} rank {rank}"
            assert_trajectories_close(trajectory, expected, label)
            assert all(kept_locally), f"{label}: gradients left p.grad inside no_sync"


def test_nested_no_sync_is_an_error_that_leaves_the_outer_block_working() -> None:
    model = make_model()
    optimizer = shardopt.SGD(model.parameters(), lr=0.1, stage=2)
    with optimizer.no_sync():
        with pytest.raises(RuntimeError, match="no_sync\\(\\) is already active: blocks of it do not nest"):
            with optimizer.no_sync():
                pass
        loss_of(model, 0, 0).backward()
        assert all(p.grad is not None for p in model.parameters())
    loss_of(model, 0, 1).backward()
    assert all(isinstance(p.grad, TakenGrad) for p in model.parameters())  # outside: taken into the reduction
