"""Determinism: the same seed gives bitwise-identical parameters run after run at one world size,
and the same parameters within fp tolerance across world sizes."""

from __future__ import annotations

from typing import Any

import torch

import shardopt
from tests.common import assert_trajectories_close, flat_params, loss_of, make_model
from tests.world import run_world

STEPS = 5
OPTIONS: dict[str, Any] = {"bucket_cap_mb": 1e-4, "overlap_param_gather": True}


def seeded_run() -> list[torch.Tensor]:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(seed=7)
    optimizer = shardopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **OPTIONS)
    trajectory = []
    for step in range(STEPS):
        optimizer.zero_grad()
        # The data of two ranks whatever the world, so every world size trains on the same mean.
        mine = [r for r in range(2) if r % world == rank]
        if mine:
            (sum(loss_of(model, r, step) for r in mine) * world / 2).backward()
        optimizer.step()
        optimizer.finish_param_gather()
        trajectory.append(flat_params(model))
    return trajectory


def test_same_seed_is_bitwise_identical_run_after_run_and_close_across_world_sizes() -> None:
    first = run_world(seeded_run, 2)
    again = run_world(seeded_run, 2, fresh=True)  # a new process group, new processes
    for rank in range(2):
        for a, b in zip(first[rank], again[rank], strict=True):
            assert torch.equal(a, b), "two runs with the same seed differ"
    for ours in (run_world(seeded_run, 1)[0], run_world(seeded_run, 3)[0]):
        assert_trajectories_close(ours, first[0], "across world sizes", rtol=1e-5, atol=1e-6)
