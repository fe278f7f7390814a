"""With default keywords, code that reads or changes ``p.grad`` between backward and step sees what it
sees under DDP with torch.optim: the mean gradient, there when backward returns.

Each run trains the same model on 2 gloo ranks twice in the same world, once with a shardopt
optimizer (default keywords) and once with DDP driving plain torch.optim, through the same loop:
torch's own ``clip_grad_norm_`` over ``model.parameters()`` (the norms it returns must agree too),
skipping a non-finite batch by ``model.zero_grad()``, accumulating by not zeroing, and DDP itself
wrapping the model after the optimizer was built (what Accelerate, HF Trainer and Lightning do),
accumulating there inside DDP's ``no_sync()``. fp32 parity bounds: only the order in which the ranks'
gradients are summed differs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
import torch
from torch import nn

import shardopt
from tests.common import assert_trajectories_close, flat_params, loss_of, make_model
from tests.world import run_world

WORLD = 2
STEPS = 6
ALGORITHMS = {
    "AdamW": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
}
NAN_AT = 2  # the iteration whose loss is made NaN on every rank, then skipped


def iteration(model: nn.Module, optimizer: torch.optim.Optimizer, pattern: str, step: int, rank: int) -> Any:
    """One iteration of ``pattern`` on ``model`` (DDP-wrapped where the pattern says); what it returns
    besides the parameters (the clipped norm), or "skipped"."""
    if pattern == "clip":
        loss_of(model, rank, step).backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        optimizer.step()
        optimizer.zero_grad()
        return norm.item()
    if pattern == "skip-nonfinite":
        loss = loss_of(model, rank, step) * (math.nan if step == NAN_AT else 1.0)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=math.inf)
        if not torch.isfinite(norm):
            model.zero_grad()  # as HF Trainer zeroes: the module's, not the optimizer's
            return "skipped"
        optimizer.step()
        model.zero_grad()
        return norm.item()
    if pattern == "accumulate":
        loss_of(model, rank, step).backward()
        if step % 2 == 0:
            return None  # no zero_grad: the next backward adds to these
        optimizer.step()
        optimizer.zero_grad()
        return None
    if pattern == "ddp-no_sync":
        syncing = step % 2 == 1
        with contextlib.nullcontext() if syncing else model.no_sync():
            loss_of(model, rank, step).backward()
        if not syncing:
            return None
        norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        optimizer.step()
        optimizer.zero_grad()
        return norm.item()
    raise ValueError(pattern)


def train(algorithm: str, pattern: str, sharded: bool) -> dict[str, Any]:
    import torch.distributed as dist

    rank = dist.get_rank()
    torch_class, kwargs = ALGORITHMS[algorithm]
    model = make_model()
    if sharded:
        optimizer = shardopt.ShardedOptimizer(model.parameters(), torch_class, **kwargs)
    else:
        optimizer = torch_class(model.parameters(), **kwargs)
    # torch.optim runs under DDP always; shardopt in a plain loop, or under DDP made after it (frameworks).
    wrapped = nn.parallel.DistributedDataParallel(model) if not sharded or pattern.startswith("ddp") else model
    returned, trajectory = [], []
    for step in range(STEPS):
        returned.append(iteration(wrapped, optimizer, pattern, step, rank))
        trajectory.append(flat_params(model))
    return {"returned": returned, "trajectory": trajectory}


PATTERNS = ["clip", "skip-nonfinite", "accumulate", "ddp-no_sync"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_p_grad_patterns_train_as_under_ddp_with_torch_optim(algorithm: str, pattern: str) -> None:
    ours = run_world(train, WORLD, algorithm, pattern, True)
    reference = run_world(train, WORLD, algorithm, pattern, False)
    for rank, (mine, theirs) in enumerate(zip(ours, reference)):
        label = f"{algorithm} {pattern} rank {rank}"
        for step, (a, b) in enumerate(zip(mine["returned"], theirs["returned"])):
            expected = pytest.approx(b, rel=1e-5, abs=1e-6) if isinstance(b, float) else b
            assert a == expected, f"{label}: returned at step {step}"
        assert_trajectories_close(mine["trajectory"], theirs["trajectory"], label)
        if pattern == "skip-nonfinite":
            assert mine["returned"][NAN_AT] == "skipped"
            assert torch.isfinite(mine["trajectory"][-1]).all()
