"""Overlap of communication with compute: lazy parameter all-gathers waited by forward pre-hooks
(``overlap_param_gather=True``) and the stage-2 staging buffers gradients pass through."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch

import shardopt
from shardopt.elements.param_gather import MAX_IN_FLIGHT
from shardopt.elements.reducer import MAX_STAGING
from shardopt.shared import hook_handles
from tests.common import assert_trajectories_close, batch, flat_params, loss_of, make_model, reference_run
from tests.world import run_world

STEPS = 5
ONE_BUCKET_PER_PARAMETER = {"bucket_cap_mb": 1e-5}


def _global_pre_hooks() -> int:
    return len(torch.nn.modules.module._global_forward_pre_hooks)


def lazy_gather_run() -> dict[str, Any]:
    import torch.distributed as dist

    rank = dist.get_rank()
    model = make_model()
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2, overlap_param_gather=True, **ONE_BUCKET_PER_PARAMETER)
    baseline_hooks = _global_pre_hooks()
    seen_after_forward, pending = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        if step == 2:
            # step() left its last MAX_IN_FLIGHT gathers in flight. Only ``hidden`` runs: its two buckets
            # (weight, bias) are finished, with those issued before them; ``out``'s two are still pending.
            before = optimizer._gathers.pending_buffers
            model.hidden(batch(rank, step)[0])
            pending.append((before, optimizer._gathers.pending_buffers))
        loss = loss_of(model, rank, step)
        # ``scale`` is the top module's own parameter: its pre-hook waited for it, so nothing is left.
        pending.append((optimizer._gathers.pending_buffers, _global_pre_hooks() - baseline_hooks))
        seen_after_forward.append(flat_params(model))
        loss.backward()
        optimizer.step()
    optimizer.finish_param_gather()
    return {
        "trajectory": seen_after_forward[1:] + [flat_params(model)],
        "pending": pending,
        "hooks_after_step": _global_pre_hooks() - baseline_hooks,
    }


@pytest.mark.parametrize("world_size", [2, 3])
def test_lazy_param_gather_waits_per_module_and_matches_torch(world_size: int) -> None:
    reference, _ = reference_run(torch.optim.Adam, {"lr": 1e-2}, world_size, STEPS)
    for rank, result in enumerate(run_world(lazy_gather_run, world_size)):
        assert_trajectories_close(result["trajectory"], reference, f"overlap_param_gather N={world_size} rank {rank}")
        pending = result["pending"]
        assert pending[2] == (MAX_IN_FLIGHT, 2)  # step 2, after ``hidden`` alone
        assert all(entry == (0, 0) for entry in pending[:2] + pending[3:])  # after every whole forward
        assert result["hooks_after_step"] == 0  # finish_param_gather() removed the hook


def dropped_optimizer_hook() -> tuple[int, int]:
    model = make_model()
    baseline = _global_pre_hooks()
    optimizer = shardopt.SGD(model.parameters(), lr=0.1, overlap_param_gather=True, **ONE_BUCKET_PER_PARAMETER)
    loss_of(model, 0, 0).backward()
    optimizer.step()
    installed = _global_pre_hooks() - baseline
    optimizer.finish_param_gather()  # a collective: both ranks wait before the optimizer goes
    loss_of(model, 0, 1).backward()
    optimizer.step()
    del optimizer
    gc.collect()
    loss_of(model, 0, 2)  # the waiter finds its optimizer gone and removes itself
    # The watch of the collected optimizer goes at the next hook installation, which sweeps (hook_handles.py;
    # not from its finalizer, which gc may run inside torch's iteration over the hooks).
    hook_handles.sweep()
    return installed, _global_pre_hooks() - baseline


def test_hook_of_a_dropped_optimizer_removes_itself() -> None:
    # The dropped optimizer's last gathers are never waited: the world cannot take another call.
    # Two: the gathers' waiter, and the watch for a DDP module made around the model (ddp_watch.py).
    for installed, left in run_world(dropped_optimizer_hook, 2, fresh=True):
        assert (installed, left) == (2, 0)


def staging_run(stage: int) -> list[dict[str, int]]:
    import torch.distributed as dist

    model = make_model()
    optimizer = shardopt.AdamW(model.parameters(), lr=1e-2, stage=stage, **ONE_BUCKET_PER_PARAMETER)
    stats = []
    for step in range(3):
        optimizer.zero_grad()
        loss_of(model, dist.get_rank(), step).backward()
        optimizer.step()
        stats.append({"reduce": optimizer._reducer.staging_bytes, "gather": optimizer._gathers.staging_bytes})
        assert optimizer.memory_stats()["staging_bytes"] == stats[-1]["reduce"] + stats[-1]["gather"]
    return [dict(s, largest_bucket=max(b.layout.numel * 4 for b in optimizer.buffers)) for s in stats]


@pytest.mark.parametrize(("world_size", "stage"), [(1, 2), (2, 2), (3, 2), (2, 1)])
def test_stage2_gradients_pass_through_a_few_reused_staging_buffers(world_size: int, stage: int) -> None:
    for stats in run_world(staging_run, world_size, stage):
        # Updated parameters pass through at most MAX_IN_FLIGHT buckets on their way into the parameters.
        gather = [s["gather"] for s in stats]
        assert gather[0] == gather[-1] > 0
        assert gather[0] <= MAX_IN_FLIGHT * stats[0]["largest_bucket"]
        staging = [s["reduce"] for s in stats]
        if world_size <= 2 or stage == 1:
            # A world of one copies into the shard; two gloo ranks read the gradients where autograd
            # left them; stage 1 reduces in place.
            assert staging == [0, 0, 0]
        else:
            assert staging[0] == staging[-1] > 0  # reused: no growth after the first step
            assert staging[0] <= MAX_STAGING * stats[0]["largest_bucket"]
