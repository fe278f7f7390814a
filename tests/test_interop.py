"""Interop: under DDP, two optimizers in one job, add_param_group after a resume, and no dummy steps."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch
from torch import nn

import shardopt
from shardopt import checkpoint
from tests.common import (
    assert_trajectories_close,
    flat_params,
    loss_of,
    make_model,
    reference_run,
    set_mean_grads,
)
from tests.world import run_world

STEPS = 4


def ddp_run() -> dict[str, list[torch.Tensor]]:
    """DDP averages the gradients; ShardedOptimizer(grad_reduction=None) only shards the state."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    trajectories = {}
    for stage in (1, 2):
        model = make_model()
        ddp = DistributedDataParallel(model)
        optimizer = shardopt.Adam(ddp.parameters(), lr=1e-2, stage=stage, grad_reduction=None)
        trajectory = []
        for step in range(STEPS):
            optimizer.zero_grad()
            loss_of(ddp, rank, step).backward()
            optimizer.step()
            trajectory.append(flat_params(model))
        trajectories[f"stage {stage}"] = trajectory
    return trajectories


@pytest.mark.parametrize("world_size", [2, 3])
def test_under_ddp_grad_reduction_none_equals_torch(world_size: int) -> None:
    expected, _ = reference_run(torch.optim.Adam, {"lr": 1e-2}, world_size, STEPS)
    for trajectories in run_world(ddp_run, world_size):
        for label, trajectory in trajectories.items():
            assert_trajectories_close(trajectory, expected, f"DDP + {label} N={world_size}")


def split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The matrices, and everything else: the split of the Muon + AdamW recipe."""
    matrices = [p for p in model.parameters() if p.ndim == 2]
    return matrices, [p for p in model.parameters() if p.ndim != 2]


def two_optimizers_run() -> list[torch.Tensor]:
    import torch.distributed as dist

    rank = dist.get_rank()
    model = make_model()
    matrices, rest = split(model)
    first = shardopt.AdamW(matrices, lr=1e-2, weight_decay=0.1)
    second = shardopt.SGD(rest, lr=0.1, momentum=0.9, stage=1)
    trajectory = []
    for step in range(STEPS):
        first.zero_grad()
        second.zero_grad()
        loss_of(model, rank, step).backward()
        first.step()
        second.step()
        trajectory.append(flat_params(model))
    return trajectory


@pytest.mark.parametrize("world_size", [2, 3])
def test_two_sharded_optimizers_over_disjoint_parameters(world_size: int) -> None:
    model = make_model()
    matrices, rest = split(model)
    first = torch.optim.AdamW(matrices, lr=1e-2, weight_decay=0.1)
    second = torch.optim.SGD(rest, lr=0.1, momentum=0.9)
    expected = []
    for step in range(STEPS):
        set_mean_grads(model, world_size, step)
        first.step()
        second.step()
        expected.append(flat_params(model))
    for trajectory in run_world(two_optimizers_run, world_size):
        assert_trajectories_close(trajectory, expected, "AdamW on matrices + SGD on the rest")


def unfreeze_run(directory: pathlib.Path, phase: str) -> list[torch.Tensor]:
    """The output layer is frozen (and not in the optimizer) for the first STEPS steps; a resumed run
    unfreezes it and adds it with add_param_group. "save": the first half and a checkpoint;
    "resume": load it and go on at another world size; "reference-free": all of it in one run."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    model.out.requires_grad_(False)
    optimizer = shardopt.Adam([model.hidden.weight, model.hidden.bias, model.scale], lr=1e-2)
    trajectory = []
    steps = range(STEPS) if phase == "save" else range(STEPS, 2 * STEPS)
    if phase == "resume":
        checkpoint.load(directory, model=model, optimizer=optimizer)
    for step in steps:
        if step == STEPS:
            model.out.requires_grad_(True)
            optimizer.add_param_group({"params": list(model.out.parameters()), "lr": 5e-3})
        optimizer.zero_grad()
        # Every world trains on the data of two ranks, so that the mean gradient is the same.
        mine = [r for r in range(2) if r % world == rank]
        if mine:
            (sum(loss_of(model, r, step) for r in mine) * world / 2).backward()
        optimizer.step()
        trajectory.append(flat_params(model))
    if phase == "save":
        checkpoint.save(directory, model=model, optimizer=optimizer)
    return trajectory


def test_add_param_group_after_a_resume_unfreezes_a_layer(tmp_path: pathlib.Path) -> None:
    model = make_model()
    model.out.requires_grad_(False)
    optimizer = torch.optim.Adam([model.hidden.weight, model.hidden.bias, model.scale], lr=1e-2)
    expected = []
    for step in range(2 * STEPS):
        if step == STEPS:
            model.out.requires_grad_(True)
            optimizer.add_param_group({"params": list(model.out.parameters()), "lr": 5e-3})
        set_mean_grads(model, 2, step)
        optimizer.step()
        expected.append(flat_params(model))
    first_half = run_world(unfreeze_run, 2, tmp_path / "checkpoint", "save")[0]
    assert_trajectories_close(first_half, expected[:STEPS], "before the save")
    for trajectory in run_world(unfreeze_run, 3, tmp_path / "checkpoint", "resume"):
        assert_trajectories_close(trajectory, expected[STEPS:], "after the resume at N=3", rtol=1e-4, atol=1e-5)


NO_DUMMY_CASES = {
    "Adam": {"lr": 1e-2},
    "Adagrad": {"lr": 0.1, "initial_accumulator_value": 0.5},
    "SGD": {"lr": 0.1, "momentum": 0.9},
}


def no_dummy_step_run(directory: pathlib.Path) -> dict[str, Any]:
    """Creating state and loading it (state_dict or checkpoint) leave parameters and steps as they were."""
    import torch.distributed as dist

    rank = dist.get_rank()
    found: dict[str, Any] = {}
    for name, kwargs in NO_DUMMY_CASES.items():
        model = make_model()
        before = flat_params(model)
        optimizer = getattr(shardopt, name)(model.parameters(), **kwargs)
        found[f"{name} created"] = (torch.equal(flat_params(model), before), optimizer.state_dict())
        for step in range(2):
            optimizer.zero_grad()
            loss_of(model, rank, step).backward()
            optimizer.step()
        saved, trained = optimizer.state_dict(), flat_params(model)
        checkpoint.save(directory / name, model=model, optimizer=optimizer)
        for how in ("load_state_dict", "checkpoint.load"):
            fresh = make_model()
            fresh.load_state_dict(model.state_dict())
            other = getattr(shardopt, name)(fresh.parameters(), **kwargs)
            if how == "load_state_dict":
                other.load_state_dict(saved)
            else:
                checkpoint.load(directory / name, model=fresh, optimizer=other)
            steps = {index: entry.get("step") for index, entry in other.state_dict()["state"].items()}
            found[f"{name} {how}"] = (torch.equal(flat_params(fresh), trained), steps)
        found[f"{name} saved steps"] = {index: entry.get("step") for index, entry in saved["state"].items()}
    return found


def test_state_is_created_and_loaded_without_a_dummy_step(tmp_path: pathlib.Path) -> None:
    for found in run_world(no_dummy_step_run, 2, tmp_path):
        for name, kwargs in NO_DUMMY_CASES.items():
            unchanged, state = found[f"{name} created"]
            assert unchanged, f"{name}: creating the optimizer changed the parameters"
            # Exactly torch's state before any step: none, or Adagrad's eager state at step 0.
            model = make_model()
            expected = getattr(torch.optim, name)(model.parameters(), **kwargs).state_dict()
            assert state["state"].keys() == expected["state"].keys(), name
            for index, entry in expected["state"].items():
                for key, value in entry.items():
                    torch.testing.assert_close(state["state"][index][key], value, msg=f"{name} {key}")
            for how in ("load_state_dict", "checkpoint.load"):
                unchanged, steps = found[f"{name} {how}"]
                assert unchanged, f"{name}: {how} changed the parameters"
                assert steps == found[f"{name} saved steps"], f"{name}: {how} changed the step counts"
