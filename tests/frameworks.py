"""What the framework tests share: the optimizers they compare, the environment torchrun would set,
and the comparison of a shardopt run with the same framework driving plain torch.optim."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
import torch

import shardopt
from tests.world import run_world

WORLD = 2
# The optimizers each framework test runs: the torch.optim class, its keywords, and shardopt's. AdamW
# and SGD with momentum at shardopt's defaults (the drop-in); AdamW at stage 2 (gradients sharded too:
# under a framework's DDP it takes DDP's gradients); Adafactor, of the scheme that keeps whole tensors
# on owner ranks and reduces at the end of backward.
SETTINGS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any], dict[str, Any]]] = {
    "AdamW": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, {}),
    "SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, {}),
    "AdamW-stage2": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, {"stage": 2}),
    "Adafactor": (torch.optim.Adafactor, {"lr": 1e-2}, {}),
}


def torchrun_environment() -> None:
    """What torchrun sets in a rank, over the process group the world already has: Accelerate, HF
    Trainer and Lightning read it (TORCHELASTIC_RUN_ID tells Lightning the processes are launched)."""
    import torch.distributed as dist

    rank, world = str(dist.get_rank()), str(dist.get_world_size())
    os.environ.update(
        {
            "TORCHELASTIC_RUN_ID": "shardopt-test",
            "RANK": rank,
            "LOCAL_RANK": rank,
            "GROUP_RANK": "0",
            "WORLD_SIZE": world,
            "LOCAL_WORLD_SIZE": world,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "0",
            "HF_HUB_OFFLINE": "1",
        }
    )


def make_optimizer(
    params: Iterable[Any], setting: str, sharded: bool, lr: float | None = None, **ours: Any
) -> torch.optim.Optimizer:
    """The optimizer of ``setting`` (``lr`` instead of its own where given): shardopt's, with the
    setting's keywords and ``ours`` over them, or plain torch.optim's."""
    torch_class, kwargs, keywords = SETTINGS[setting]
    kwargs = kwargs if lr is None else {**kwargs, "lr": lr}
    if sharded:
        return shardopt.ShardedOptimizer(params, torch_class, **kwargs, **{**keywords, **ours})
    return torch_class(params, **kwargs)


def assert_runs_close(
    mine: dict[str, Any], theirs: dict[str, Any], label: str, rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    """One run against the reference's: every list of numbers ("losses", "norms") and every tensor or
    list of tensors ("params", "trajectory") it recorded."""
    for key, expected in theirs.items():
        got = mine[key]
        if isinstance(expected, torch.Tensor):
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=f"{label}: {key}")
        elif expected and isinstance(expected[0], torch.Tensor):
            for step, (a, b) in enumerate(zip(got, expected, strict=True)):
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"{label}: {key} {step}")
        else:
            assert got == pytest.approx(expected, rel=rtol, abs=atol), f"{label}: {key}"


def compare_with_torch(
    runs: Callable[[str, bool, pathlib.Path], dict[str, Any]],
    algorithm: str,
    directory: pathlib.Path,
    names: Sequence[str],
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``runs(algorithm, sharded, directory)`` on a fresh world with shardopt, then with torch.optim (the
    frameworks change process-wide state); every run in ``names`` close on every rank. Both results."""
    ours = run_world(runs, WORLD, algorithm, True, directory, fresh=True)
    reference = run_world(runs, WORLD, algorithm, False, directory, fresh=True)
    for rank, (mine, theirs) in enumerate(zip(ours, reference)):
        for name in names:
            assert_runs_close(mine[name], theirs[name], f"{algorithm} {name} rank {rank}", rtol, atol)
    return ours, reference
