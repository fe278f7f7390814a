"""clip_grad_norm_: torch.nn.utils.clip_grad_norm_ of the mean gradient, computed from the shards."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import shardopt
from tests.common import assert_trajectories_close, flat_params, loss_of, make_model, set_mean_grads
from tests.world import run_world

STEPS = 4
# (max_norm, norm_type): clipping every step, at some steps only, never; the 2-, 1- and inf-norms.
CLIPS = [(0.05, 2.0), (0.3, 2.0), (1e6, 2.0), (0.1, 1.0), (0.02, math.inf), (0.2, 3.0)]
OPTIONS = {"stage2": {"stage": 2}, "stage1": {"stage": 1}, "many-buckets": {"bucket_cap_mb": 1e-5}}


def sharded_run(options: dict[str, Any]) -> list[tuple[list[torch.Tensor], list[float], list[bool]]]:
    import torch.distributed as dist

    rank = dist.get_rank()
    results = []
    for max_norm, norm_type in CLIPS:
        model = make_model()
        optimizer = shardopt.Adam(model.parameters(), lr=1e-2, **options)
        trajectory, norms, grads_clipped = [], [], []
        for step in range(STEPS):
            optimizer.zero_grad()
            loss_of(model, rank, step).backward()
            norms.append(float(optimizer.clip_grad_norm_(max_norm, norm_type)))
            # Stage 1 leaves the clipped mean gradient in p.grad, as torch's clip_grad_norm_ does.
            grads = [p.grad for p in model.parameters()]
            grads_clipped.append(all(g is not None for g in grads) if options.get("stage") == 1 else True)
            optimizer.step()
            trajectory.append(flat_params(model))
        results.append((trajectory, norms, grads_clipped))
    return results


def reference(world_size: int, max_norm: float, norm_type: float) -> tuple[list[torch.Tensor], list[float]]:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trajectory, norms = [], []
    for step in range(STEPS):
        set_mean_grads(model, world_size, step)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)))
        optimizer.step()
        trajectory.append(flat_params(model))
    return trajectory, norms


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("world_size", [2, 3])
def test_clip_grad_norm_equals_torch_on_the_mean_gradient(world_size: int, options: str) -> None:
    per_rank = run_world(sharded_run, world_size, OPTIONS[options])
    for case, (max_norm, norm_type) in enumerate(CLIPS):
        expected_trajectory, expected_norms = reference(world_size, max_norm, norm_type)
        label = f"clip_grad_norm_({max_norm}, {norm_type}) N={world_size} {options}"
        for trajectory, norms, grads_present in (rank[case] for rank in per_rank):
            assert_trajectories_close(trajectory, expected_trajectory, label)
            torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=1e-7, msg=label)
            assert all(grads_present), label


def bad_calls() -> dict[str, str]:
    import torch.distributed as dist

    rank = dist.get_rank()
    model = make_model()
    optimizer = shardopt.SGD(model.parameters(), lr=0.1)
    caught = {}
    for name, call in [
        ("negative", lambda: optimizer.clip_grad_norm_(-1.0)),
        ("norm-zero", lambda: optimizer.clip_grad_norm_(1.0, norm_type=0)),
    ]:
        with pytest.raises(ValueError) as error:
            call()
        caught[name] = str(error.value)
    # A non-finite gradient on one rank only: every rank raises, and nothing is updated.
    before = flat_params(model)
    loss_of(model, rank, 0).backward()
    if rank == 1:  # written after backward released the gradients (stage 2): reduced in a second round
        model.out.bias.grad = torch.full_like(model.out.bias, math.inf)
    with pytest.raises(RuntimeError) as error:
        optimizer.clip_grad_norm_(1.0, error_if_nonfinite=True)
    caught["nonfinite"] = str(error.value)
    optimizer.zero_grad()
    caught["untouched"] = str(torch.equal(flat_params(model), before))
    # clip_grad_norm_ and then a closure that recomputes the gradients: refused.
    loss_of(model, rank, 1).backward()
    optimizer.clip_grad_norm_(1.0)
    with pytest.raises(RuntimeError) as error:
        optimizer.step(lambda: loss_of(model, rank, 1))
    caught["closure"] = str(error.value)
    return caught


def test_bad_clipping_calls_raise_clear_errors_on_every_rank() -> None:
    for caught in run_world(bad_calls, 2):
        assert "max_norm must be a number >= 0, got -1.0" in caught["negative"]
        assert "norm_type must be a positive number or math.inf, got 0.0" in caught["norm-zero"]
        assert "non-finite" in caught["nonfinite"]
        assert caught["untouched"] == "True"
        assert "call clip_grad_norm_() inside the closure" in caught["closure"]


# shardopt.clip_grad_norm_ over several optimizers: the Muon recipe (Muon for the matrices, AdamW
# for the biases) clipped by one norm over the whole model, as torch's function over model.parameters().
JOINT_CLIPS = [(0.05, 2.0), (0.02, math.inf), (1e6, 2.0)]


def split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    params = list(model.parameters())
    return [p for p in params if p.dim() == 2], [p for p in params if p.dim() != 2]


def joint_run() -> list[tuple[list[torch.Tensor], list[float]]]:
    import torch.distributed as dist

    rank = dist.get_rank()
    results = []
    for max_norm, norm_type in JOINT_CLIPS:
        model = make_model()
        matrices, rest = split(model)
        optimizers = [shardopt.Muon(matrices, lr=0.05), shardopt.AdamW(rest, lr=1e-2)]
        trajectory, norms = [], []
        for step in range(STEPS):
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss_of(model, rank, step).backward()
            norms.append(float(shardopt.clip_grad_norm_(optimizers, max_norm, norm_type)))
            for optimizer in optimizers:
                optimizer.step()
            trajectory.append(flat_params(model))
        results.append((trajectory, norms))
    return results


def joint_reference(world_size: int, max_norm: float, norm_type: float) -> tuple[list[torch.Tensor], list[float]]:
    model = make_model()
    matrices, rest = split(model)
    optimizers = [torch.optim.Muon(matrices, lr=0.05), torch.optim.AdamW(rest, lr=1e-2)]
    trajectory, norms = [], []
    for step in range(STEPS):
        set_mean_grads(model, world_size, step)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)))
        for optimizer in optimizers:
            optimizer.step()
        trajectory.append(flat_params(model))
    return trajectory, norms


@pytest.mark.parametrize("world_size", [2, 3])
def test_one_norm_over_several_optimizers_equals_torch_over_the_model(world_size: int) -> None:
    per_rank = run_world(joint_run, world_size)
    for case, (max_norm, norm_type) in enumerate(JOINT_CLIPS):
        expected_trajectory, expected_norms = joint_reference(world_size, max_norm, norm_type)
        label = f"shardopt.clip_grad_norm_([Muon, AdamW], {max_norm}, {norm_type}) N={world_size}"
        for trajectory, norms in (rank[case] for rank in per_rank):
            # Muon runs Newton-Schulz in bfloat16: within its rounding, as in tests/test_owned.py.
            assert_trajectories_close(trajectory, expected_trajectory, label, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=1e-7, msg=label)


def test_clip_grad_norm_of_something_else_names_it() -> None:
    model = make_model()
    with pytest.raises(TypeError, match=r"optimizers\[0\] is a SGD: clip_grad_norm_ clips shardopt optimizers"):
        shardopt.clip_grad_norm_([torch.optim.SGD(model.parameters(), lr=0.1)], 1.0)
    with pytest.raises(ValueError, match="optimizers is empty"):
        shardopt.clip_grad_norm_([], 1.0)
