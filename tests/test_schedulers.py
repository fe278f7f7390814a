"""Every torch.optim.lr_scheduler class (and SWALR) drives a ShardedOptimizer exactly as it drives
torch.optim: schedulers edit param_groups (lr, momentum, betas), and the next step obeys."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler
from torch.optim.swa_utils import SWALR

import shardopt
from tests.common import (
    assert_state_dicts_equal,
    assert_trajectories_close,
    flat_params,
    loss_of,
    make_model,
    reference_run,
    step_scheduler,
)
from tests.world import run_world

STEPS = 10
Factory = Callable[[torch.optim.Optimizer], Any]


def _sequential(optimizer: torch.optim.Optimizer) -> lr_scheduler.SequentialLR:
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=3)
    decay = lr_scheduler.ExponentialLR(optimizer, gamma=0.8)
    return lr_scheduler.SequentialLR(optimizer, [warmup, decay], milestones=[3])


def _chained(optimizer: torch.optim.Optimizer) -> lr_scheduler.ChainedScheduler:
    return lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(optimizer, factor=0.5, total_iters=4), lr_scheduler.ExponentialLR(optimizer, 0.9)]
    )


SCHEDULERS: dict[str, Factory] = {
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda step: 1 / (1 + step)),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda step: 0.9),
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.25, total_iters=4),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=6),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.7),
    "SequentialLR": _sequential,
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=6, eta_min=1e-4),
    "ChainedScheduler": _chained,
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=5e-2, step_size_up=3),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=5e-2, total_steps=STEPS),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=8, power=2.0),
    "SWALR": lambda o: SWALR(o, swa_lr=5e-3, anneal_epochs=4),
}
# SGD with momentum and Adam: CyclicLR and OneCycleLR cycle the momentum, or Adam's betas.
OPTIMIZERS = {"SGD": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}), "Adam": (torch.optim.Adam, {"lr": 1e-2})}


def test_every_torch_scheduler_is_covered() -> None:
    public = {name for name in lr_scheduler.__all__ if name != "LRScheduler"}
    assert public | {"SWALR"} == set(SCHEDULERS)


def train_with_schedulers() -> dict[tuple[str, str], Any]:
    import torch.distributed as dist

    rank = dist.get_rank()
    results = {}
    for optimizer_name, (optimizer_class, kwargs) in OPTIMIZERS.items():
        for scheduler_name, factory in SCHEDULERS.items():
            model = make_model()
            optimizer = shardopt.ShardedOptimizer(model.parameters(), optimizer_class, **kwargs)
            scheduler = factory(optimizer)
            trajectory = []
            for step in range(STEPS):
                optimizer.zero_grad()
                loss_of(model, rank, step).backward()
                optimizer.step()
                step_scheduler(scheduler)
                trajectory.append(flat_params(model))
            results[optimizer_name, scheduler_name] = (trajectory, optimizer.state_dict())
    return results


@functools.cache
def sharded_results() -> dict[tuple[str, str], Any]:
    return run_world(train_with_schedulers, 2)[0]


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
def test_scheduler_drives_sharded_optimizer_like_torch(scheduler_name: str, optimizer_name: str) -> None:
    optimizer_class, kwargs = OPTIMIZERS[optimizer_name]
    trajectory, state = sharded_results()[optimizer_name, scheduler_name]
    reference, reference_state = reference_run(optimizer_class, kwargs, 2, STEPS, SCHEDULERS[scheduler_name])
    label = f"{scheduler_name} on {optimizer_name}"
    assert_trajectories_close(trajectory, reference, label)
    assert_state_dicts_equal(state, reference_state, label)  # param_groups hold the scheduled lr
