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
    # Sharded by whole tensors (owners), reduced at the end of backward rather than bucket by bucket.
    "Adafactor": (torch.optim.Adafactor, {"lr": 1e-2}),
    "Muon": (torch.optim.Muon, {"lr": 1e-2}),  # matrices only: the other parameters are frozen
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
    if pattern == "clip-optimizer":  # shardopt's own clipping, torch's under DDP
        loss_of(model, rank, step).backward()
        clip = getattr(optimizer, "clip_grad_norm_", None)
        norm = clip(0.05) if clip is not None else nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        optimizer.step()
        optimizer.zero_grad()
        return norm.item()
    if pattern.startswith("skip-by-loss"):  # "-zeroed": zero_grad(set_to_none=False)
        loss = loss_of(model, rank, step) * (math.nan if step == NAN_AT else 1.0)
        loss.backward()
        if not torch.isfinite(loss):
            model.zero_grad(set_to_none=not pattern.endswith("zeroed"))
            return "skipped"
        optimizer.step()
        model.zero_grad()
        return loss.item()
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


def train(algorithm: str, pattern: str, sharded: bool, stage: int = 1) -> dict[str, Any]:
    import torch.distributed as dist

    rank = dist.get_rank()
    torch_class, kwargs = ALGORITHMS[algorithm]
    model = make_model()
    if algorithm == "Muon":
        for param in model.parameters():
            param.requires_grad_(param.dim() == 2)
    params = [param for param in model.parameters() if param.requires_grad]
    if sharded:
        optimizer = shardopt.ShardedOptimizer(params, torch_class, **kwargs, **({"stage": 2} if stage == 2 else {}))
    else:
        optimizer = torch_class(params, **kwargs)
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
    assert_like_ddp(algorithm, pattern, stage=1)


# Stage 2 takes the gradients at backward: the patterns that do not read p.grad's values.
STAGE_2_PATTERNS = ["clip-optimizer", "skip-by-loss", "skip-by-loss-zeroed", "accumulate", "ddp-no_sync"]


@pytest.mark.parametrize("pattern", STAGE_2_PATTERNS)
@pytest.mark.parametrize("algorithm", ["AdamW", "SGD"])
def test_stage_2_patterns_that_drop_or_add_gradients_train_as_under_ddp(algorithm: str, pattern: str) -> None:
    assert_like_ddp(algorithm, pattern, stage=2)


def assert_like_ddp(algorithm: str, pattern: str, stage: int) -> None:
    ours = run_world(train, WORLD, algorithm, pattern, True, stage)
    reference = run_world(train, WORLD, algorithm, pattern, False)
    for rank, (mine, theirs) in enumerate(zip(ours, reference)):
        label = f"{algorithm} {pattern} rank {rank}"
        for step, (a, b) in enumerate(zip(mine["returned"], theirs["returned"])):
            expected = pytest.approx(b, rel=1e-5, abs=1e-6) if isinstance(b, float) else b
            assert a == expected, f"{label}: returned at step {step}"
        assert_trajectories_close(mine["trajectory"], theirs["trajectory"], label)
        if pattern.startswith("skip"):
            assert mine["returned"][NAN_AT] == "skipped"
            assert torch.isfinite(mine["trajectory"][-1]).all()


def stage_2_misuse() -> dict[str, str]:
    """What each rank raised, per case, where stage 2 cannot give torch's result: torch's clip_grad_norm_
    reading p.grad, a backward added to a gradient the last step took, one rank alone dropping one."""
    import torch.distributed as dist

    rank, found = dist.get_rank(), {}
    for case in ("torch clip", "no zero_grad after step", "dropped on one rank"):
        model = make_model()
        optimizer = shardopt.AdamW(model.named_parameters(), lr=1e-2, stage=2)
        try:
            loss_of(model, rank, 0).backward()
            if case == "torch clip":
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            elif case == "no zero_grad after step":
                optimizer.step()
                loss_of(model, rank, 1).backward()
            elif rank == 0:
                model.out.bias.grad = None
            optimizer.step()
            found[case] = "no error"
        except RuntimeError as error:
            found[case] = str(error)
        # Training goes on from a fresh gradient.
        optimizer.zero_grad()
        loss_of(model, rank, 2).backward()
        optimizer.step()
    return found


def test_stage_2_raises_on_every_rank_where_it_cannot_give_torchs_result() -> None:
    for rank, found in enumerate(run_world(stage_2_misuse, WORLD)):
        assert "clip with optimizer.clip_grad_norm_(max_norm)" in found["torch clip"], (rank, found)
        assert "no zero_grad() after step()" in found["no zero_grad after step"], (rank, found)
        dropped = found["dropped on one rank"]
        assert "out.bias" in dropped and "on 1 of 2 ranks" in dropped, (rank, found)
