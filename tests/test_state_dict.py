"""state_dict round trips across world sizes and through plain torch.optim.

shardopt at N=2 -> state_dict -> torch.optim (one process) -> state_dict -> shardopt at N=3
must continue the same trajectory as one uninterrupted torch.optim run.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

import shardopt
from tests.common import (
    assert_state_dicts_equal,
    assert_trajectories_close,
    flat_params,
    loss_of,
    make_model,
    set_mean_grads,
)
from tests.world import run_world

PHASE = 4  # steps in each of the three legs
CASES = [
    (torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True}),
    (torch.optim.SGD, {"lr": 1e-1, "momentum": 0.9, "dampening": 0.2}),
    (torch.optim.NAdam, {"lr": 1e-2}),
    (torch.optim.ASGD, {"lr": 5e-2, "t0": 2}),
    (torch.optim.Rprop, {"lr": 1e-2}),
    (torch.optim.Adagrad, {"lr": 1e-1}),
    (torch.optim.RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.5}),
]
IDS = [c[0].__name__ for c in CASES]


def sharded_leg(cases: list, start: int, saved: list | None) -> list[Any]:
    """On each rank: (optionally load model and optimizer state, then) PHASE steps from step ``start``."""
    import torch.distributed as dist

    rank = dist.get_rank()
    results = []
    for i, (optimizer_class, kwargs) in enumerate(cases):
        model = make_model()
        optimizer = shardopt.ShardedOptimizer(model.parameters(), optimizer_class, **kwargs)
        if saved is not None:
            model.load_state_dict(saved[i][0])
            optimizer.load_state_dict(saved[i][1])
        loaded = optimizer.state_dict()
        trajectory = []
        for step in range(start, start + PHASE):
            optimizer.zero_grad()
            loss_of(model, rank, step).backward()
            optimizer.step()
            trajectory.append(flat_params(model))
        results.append((loaded, trajectory, model.state_dict(), optimizer.state_dict()))
    return results


def torch_leg(optimizer_class: type, kwargs: dict, world_size: int, start: int, saved: tuple | None) -> tuple:
    model = make_model()
    optimizer = optimizer_class(model.parameters(), **kwargs)
    if saved is not None:
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
    trajectory = []
    for step in range(start, start + PHASE):
        set_mean_grads(model, world_size, step)
        optimizer.step()
        trajectory.append(flat_params(model))
    return trajectory, model.state_dict(), optimizer.state_dict()


@functools.cache
def round_trip() -> dict[str, Any]:
    first = run_world(sharded_leg, 2, CASES, 0, None)[0]
    middle = [
        torch_leg(cls, kwargs, 3, PHASE, (model_state, opt_state))
        for (cls, kwargs), (_, _, model_state, opt_state) in zip(CASES, first)
    ]
    saved = [(model_state, opt_state) for _, model_state, opt_state in middle]
    last = run_world(sharded_leg, 3, CASES, 2 * PHASE, saved)[0]
    return {"first": first, "middle": middle, "last": last}


def uninterrupted(optimizer_class: type, kwargs: dict) -> list[torch.Tensor]:
    """One torch.optim run over the same three legs: 2 ranks' mean gradient, then 3 ranks'."""
    first, model_state, opt_state = torch_leg(optimizer_class, kwargs, 2, 0, None)
    second, model_state, opt_state = torch_leg(optimizer_class, kwargs, 3, PHASE, (model_state, opt_state))
    third, _, _ = torch_leg(optimizer_class, kwargs, 3, 2 * PHASE, (model_state, opt_state))
    return first + second + third


@pytest.mark.parametrize(("index", "case"), list(enumerate(CASES)), ids=IDS)
def test_round_trip_n2_torch_n3_continues_the_trajectory(index: int, case: tuple) -> None:
    optimizer_class, kwargs = case
    result = round_trip()
    sharded_first = result["first"][index][1]
    torch_middle = result["middle"][index][0]
    sharded_last = result["last"][index][1]
    label = f"{optimizer_class.__name__} N=2 -> torch.optim -> N=3"
    assert_trajectories_close(
        sharded_first + torch_middle + sharded_last, uninterrupted(optimizer_class, kwargs), label
    )


@pytest.mark.parametrize(("index", "case"), list(enumerate(CASES)), ids=IDS)
def test_loaded_state_reads_back_unchanged(index: int, case: tuple) -> None:
    """What N=3 loads from torch.optim's dict is what its state_dict() returns before stepping."""
    result = round_trip()
    torch_state = result["middle"][index][2]
    loaded_at_n3 = result["last"][index][0]
    assert_state_dicts_equal(loaded_at_n3, torch_state, f"{case[0].__name__} load -> state_dict", rtol=0, atol=0)


def test_torch_optim_loads_a_sharded_state_dict() -> None:
    """N=2's dict is torch.optim's own format: torch loads it and gives it back unchanged."""
    result = round_trip()
    for (optimizer_class, kwargs), (_, _, _, sharded_state) in zip(CASES, result["first"]):
        optimizer = optimizer_class(make_model().parameters(), **kwargs)
        optimizer.load_state_dict(sharded_state)
        assert_state_dicts_equal(optimizer.state_dict(), sharded_state, optimizer_class.__name__, rtol=0, atol=0)


def test_load_keeps_hyperparameters_of_the_dict_and_parameters_of_the_optimizer() -> None:
    model = make_model()
    source = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.3)
    optimizer = shardopt.SGD(model.parameters(), lr=0.1)
    optimizer.load_state_dict(source.state_dict())
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"]) == (0.5, 0.3)
    assert all(a is b for a, b in zip(group["params"], model.parameters()))


def test_state_dict_of_a_fresh_optimizer_is_torchs() -> None:
    for optimizer_class, kwargs in CASES:
        model = make_model()
        sharded = shardopt.ShardedOptimizer(model.parameters(), optimizer_class, **kwargs).state_dict()
        reference = optimizer_class(make_model().parameters(), **kwargs).state_dict()
        assert_state_dicts_equal(sharded, reference, optimizer_class.__name__, rtol=0, atol=0)
