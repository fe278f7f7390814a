"""Non-finite gradients: shardopt.GradScaler for fp16 and ``skip_nonfinite``, decided alike on every rank.

One rank's inf (its loss poisoned at one step) must skip that step on every rank, as torch's
GradScaler would skip it in one process fed the mean gradient: parameters, optimizer state and
the loss scale then stay equal across ranks, and equal to that reference.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import shardopt
from tests.common import batch, make_model
from tests.world import run_world

STEPS = 6
POISONED = 2  # the step at which the last rank's loss is inf
CLIPPED = 4  # the step at which the gradients are unscaled and clipped before the step
SCALER = {"init_scale": 2.0**10, "growth_interval": 2}
SCALER_OPTIONS = {
    "stage2": {"stage": 2},
    "stage1": {"stage": 1},
    "fp32-reduce": {"reduce_dtype": torch.float32},
}


def poisoned_loss(model: nn.Module, dtype: torch.dtype, rank: int, world_size: int, step: int) -> torch.Tensor:
    x, y = batch(rank, step)
    loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
    return loss * math.inf if step == POISONED and rank == world_size - 1 else loss


def scaler_run(options: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model().to(torch.float16)
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2, **options)
    scaler = shardopt.GradScaler("cpu", **SCALER)
    params, scales = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        scaler.scale(poisoned_loss(model, torch.float16, rank, world, step)).backward()
        if step == CLIPPED:
            scaler.unscale_(optimizer)
            optimizer.clip_grad_norm_(0.05)
        scaler.step(optimizer)
        scaler.update()
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
        scales.append(scaler.get_scale())
    return {"params": params, "scales": scales, "skipped": optimizer.skipped_steps}


def scaler_reference(world_size: int, reduce_dtype: torch.dtype) -> dict[str, Any]:
    """torch.optim.Adam on an fp32 copy, with torch's GradScaler logic applied to the mean gradient."""
    master = make_model().to(torch.float16).float()
    optimizer = torch.optim.Adam(master.parameters(), lr=1e-2)
    scale, good = SCALER["init_scale"], 0
    params, scales, skipped = [], [], 0
    for step in range(STEPS):
        low = copy.deepcopy(master).to(torch.float16)
        total = [torch.zeros_like(p, dtype=reduce_dtype) for p in master.parameters()]
        for rank in range(world_size):
            low.zero_grad()
            (poisoned_loss(low, torch.float16, rank, world_size, step) * scale).backward()
            for acc, p in zip(total, low.parameters()):
                acc += p.grad.to(reduce_dtype)
        grads = [(acc / world_size * (1 / scale)).float() for acc in total]
        if all(torch.isfinite(g).all() for g in grads):
            for p, g in zip(master.parameters(), grads):
                p.grad = g
            if step == CLIPPED:
                torch.nn.utils.clip_grad_norm_(master.parameters(), 0.05)
            optimizer.step()
            good += 1
            if good == SCALER["growth_interval"]:
                scale, good = scale * 2, 0
        else:
            scale, good, skipped = scale / 2, 0, skipped + 1
        params.append(torch.cat([p.detach().to(torch.float16).reshape(-1) for p in master.parameters()]))
        scales.append(scale)
    return {"params": params, "scales": scales, "skipped": skipped}


def scaler_cases() -> dict[str, dict[str, Any]]:
    return {name: scaler_run(options) for name, options in SCALER_OPTIONS.items()}


@pytest.mark.parametrize("world_size", [2, 3])
def test_grad_scaler_skips_a_step_on_every_rank_and_matches_torch(world_size: int) -> None:
    per_rank = run_world(scaler_cases, world_size)
    for name, options in SCALER_OPTIONS.items():
        reduce_dtype = options.get("reduce_dtype", torch.float16)
        expected = scaler_reference(world_size, reduce_dtype)
        assert expected["skipped"] == 1
        # fp16 gradients are summed in gloo's order and clipped in fp16: equal within fp16 rounding.
        exact = reduce_dtype == torch.float32
        for rank, results in enumerate(per_rank):
            ours, where = results[name], f"{name} N={world_size} rank {rank}"
            assert ours["scales"] == expected["scales"], where
            assert ours["skipped"] == 1, where
            for step, (mine, theirs) in enumerate(zip(ours["params"], expected["params"], strict=True)):
                torch.testing.assert_close(
                    mine.float(), theirs.float(), rtol=0 if exact else 2e-3, atol=0 if exact else 2e-3, msg=where
                )
                assert torch.equal(mine, per_rank[0][name]["params"][step]), f"{where}: ranks differ at {step}"


def skip_run(dtype: torch.dtype, nan: bool) -> dict[str, Any]:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model().to(dtype)
    optimizer = shardopt.SGD(model.parameters(), lr=0.1, momentum=0.9, skip_nonfinite=True)
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = poisoned_loss(model, dtype, rank, world, step)
        (loss * 0 if nan and step == POISONED and rank == world - 1 else loss).backward()
        optimizer.step()
    state = optimizer.state_dict()["state"]
    return {
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "skipped": optimizer.skipped_steps,
        "momentum": state[0]["momentum_buffer"],
    }


def skip_reference(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        if step == POISONED:
            continue
        total = [torch.zeros_like(p) for p in model.parameters()]
        for rank in range(world_size):
            model.zero_grad()
            poisoned_loss(model, torch.float32, rank, world_size, step).backward()
            for acc, p in zip(total, model.parameters()):
                acc += p.grad
        for acc, p in zip(total, model.parameters()):
            p.grad = acc / world_size
        optimizer.step()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return params, optimizer.state_dict()["state"][0]["momentum_buffer"]


def skip_cases() -> list[dict[str, Any]]:
    # inf * 0 is NaN: the last rank's gradient is NaN rather than inf in the second case.
    return [skip_run(torch.float32, nan=False), skip_run(torch.float32, nan=True)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_skip_nonfinite_skips_the_step_on_every_rank(world_size: int) -> None:
    params, momentum = skip_reference(world_size)
    for results in run_world(skip_cases, world_size):
        for ours in results:
            assert ours["skipped"] == 1
            torch.testing.assert_close(ours["params"], params, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours["momentum"], momentum, rtol=1e-5, atol=1e-6)


def misuse_run() -> dict[str, Any]:
    import torch.distributed as dist

    rank = dist.get_rank()
    found = {}
    model = make_model().to(torch.float16)
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2)
    plain = torch.amp.GradScaler("cpu")
    plain.scale(poisoned_loss(model, torch.float16, rank, 2, 0)).backward()
    with pytest.raises(TypeError) as error:
        plain.step(optimizer)
    found["plain scaler"] = str(error.value)
    optimizer.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            optimizer.zero_grad()
            poisoned_loss(model, torch.float16, rank, 2, step).backward()
            optimizer.step()
    found["fp16 warnings"] = [str(w.message) for w in caught if "shardopt" in str(w.message)]
    with pytest.raises(TypeError) as error:
        shardopt.SGD(model.parameters(), lr=0.1, skip_nonfinite="yes")
    found["skip_nonfinite"] = str(error.value)
    return found


def test_misuse_gets_a_clear_error_or_one_warning_on_every_rank() -> None:
    for found in run_world(misuse_run, 2):
        assert "use shardopt.GradScaler" in found["plain scaler"]
        assert len(found["fp16 warnings"]) == 1 and "GradScaler" in found["fp16 warnings"][0]
        assert "skip_nonfinite must be True or False" in found["skip_nonfinite"]


def test_grad_scaler_still_serves_torch_optimizers() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = shardopt.GradScaler("cpu", init_scale=4.0)
    scaler.scale(poisoned_loss(model, torch.float32, 0, 2, 0)).backward()
    expected = [p.detach() - 0.1 * p.grad / 4.0 for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
