"""clip_grad_norm_ and shardopt.GradScaler for the whole-parameter coordinators: Adafactor and Muon
(each tensor on one owner rank) and SparseAdam (sharded by rows).

Clipping then stepping must equal single-process ``torch.nn.utils.clip_grad_norm_`` and torch.optim
fed the mean gradient (SparseAdam: the norm of the coalesced mean values, as torch's own function has
no kernel for sparse tensors); a GradScaler run in which one rank's gradient holds an inf at one step must equal
``torch.amp.GradScaler`` on one process fed the mean of the ranks' scaled gradients: every rank skips
that step, and the scale moves alike everywhere.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import shardopt
from tests.common import assert_trajectories_close, flat_params, loss_of, set_mean_grads
from tests.test_owned import FP32_TOLERANCE, MUON_TOLERANCE
from tests.test_owned import make as make_dense
from tests.test_sparse import loss_of as sparse_loss_of
from tests.test_sparse import make_embedding, reduced_grad
from tests.world import run_world

ALGORITHMS = ("Adafactor", "Muon", "SparseAdam")
KEYWORDS: dict[str, dict[str, Any]] = {"Adafactor": {"lr": 0.05}, "Muon": {"lr": 0.05}, "SparseAdam": {"lr": 0.05}}
STEPS = 3
# (max_norm, norm_type): clipping every step with the 2-norm and the inf-norm, and never.
CLIPS = [(0.05, 2.0), (0.02, math.inf), (1e6, 2.0)]
SCALER = {"init_scale": 2.0**10, "growth_interval": 2}
SCALER_STEPS = 5
POISONED = 1  # the step at which the last rank's gradient holds an inf
CLIPPED = 3  # the step at which the gradients are unscaled and clipped before the step


def model_of(algorithm: str) -> nn.Module:
    if algorithm == "SparseAdam":
        return make_embedding()
    return make_dense("matrices" if algorithm == "Muon" else "tiny")  # Muon takes matrices only


def loss(algorithm: str, model: nn.Module, rank: int, step: int) -> torch.Tensor:
    return sparse_loss_of(model, rank, step) if algorithm == "SparseAdam" else loss_of(model, rank, step)


def tolerance(algorithm: str) -> dict[str, float]:
    return MUON_TOLERANCE if algorithm == "Muon" else FP32_TOLERANCE


def torch_clip(algorithm: str, model: nn.Module, max_norm: float, norm_type: float, **kwargs: Any) -> float:
    """torch's clip_grad_norm_ of the gradients in ``model``; for SparseAdam, of the coalesced values
    of its sparse gradient (torch has no sparse kernel: it runs on a parameter whose grad is a view of them)."""
    if algorithm != "SparseAdam":
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type, **kwargs))
    model.weight.grad = model.weight.grad.coalesce()
    values = model.weight.grad.values()
    holder = nn.Parameter(torch.empty_like(values))
    holder.grad = values
    return float(torch.nn.utils.clip_grad_norm_([holder], max_norm, norm_type, **kwargs))


def set_mean(algorithm: str, model: nn.Module, world_size: int, step: int) -> None:
    if algorithm == "SparseAdam":
        model.weight.grad = reduced_grad(model, world_size, step, "mean")
    else:
        set_mean_grads(model, world_size, step)


# ---------------------------------------------------------------------- clipping


def clip_run() -> dict[tuple[str, float, float], tuple[list[torch.Tensor], list[float]]]:
    import torch.distributed as dist

    rank, results = dist.get_rank(), {}
    for algorithm in ALGORITHMS:
        for max_norm, norm_type in CLIPS:
            model = model_of(algorithm)
            optimizer = shardopt.ShardedOptimizer(model.parameters(), algorithm, **KEYWORDS[algorithm])
            trajectory, norms = [], []
            for step in range(STEPS):
                optimizer.zero_grad()
                loss(algorithm, model, rank, step).backward()
                norms.append(float(optimizer.clip_grad_norm_(max_norm, norm_type)))
                optimizer.step()
                trajectory.append(flat_params(model))
            results[(algorithm, max_norm, norm_type)] = (trajectory, norms)
    return results


def clip_reference(algorithm: str, world_size: int, max_norm: float, norm_type: float) -> tuple[list, list]:
    model = model_of(algorithm)
    optimizer = getattr(torch.optim, algorithm)(model.parameters(), **KEYWORDS[algorithm])
    trajectory, norms = [], []
    for step in range(STEPS):
        set_mean(algorithm, model, world_size, step)
        norms.append(torch_clip(algorithm, model, max_norm, norm_type))
        optimizer.step()
        trajectory.append(flat_params(model))
    return trajectory, norms


@pytest.mark.parametrize("world_size", [2, 3])
def test_clip_grad_norm_equals_torch_on_the_mean_gradient(world_size: int) -> None:
    per_rank = run_world(clip_run, world_size)
    for algorithm in ALGORITHMS:
        for max_norm, norm_type in CLIPS:
            expected_trajectory, expected_norms = clip_reference(algorithm, world_size, max_norm, norm_type)
            for rank, results in enumerate(per_rank):
                label = f"{algorithm} clip_grad_norm_({max_norm}, {norm_type}) N={world_size} rank {rank}"
                trajectory, norms = results[(algorithm, max_norm, norm_type)]
                assert_trajectories_close(trajectory, expected_trajectory, label, **tolerance(algorithm))
                torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=1e-7, msg=label)


def poison_first_gradient(model: nn.Module) -> None:
    """An inf in the first element of the first parameter's gradient (sparse: of its first coalesced
    row, row 1 at step POISONED, which only rank 0 owns: the others must learn of it)."""
    param = next(model.parameters())
    if param.grad.is_sparse:
        param.grad = param.grad.coalesce()
        param.grad.values().view(-1)[0] = math.inf
    else:
        param.grad.view(-1)[0] = math.inf


@contextlib.contextmanager
def poisoned_backward(model: nn.Module) -> Iterator[None]:
    """The backward inside the block gives the first parameter an inf, as poison_first_gradient does,
    before Adafactor and Muon reduce at its end (a p.grad written after that is taken as it is, by its
    owner, as torch.optim under DDP takes the p.grad it finds)."""

    def poison(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.coalesce().clone() if grad.is_sparse else grad.clone()
        (grad.values() if grad.is_sparse else grad).view(-1)[0] = math.inf
        return grad

    handle = next(model.parameters()).register_hook(poison)
    try:
        yield
    finally:
        handle.remove()


def nonfinite_clip_run() -> dict[str, dict[str, Any]]:
    """One rank's gradient holds an inf: clip_grad_norm_(error_if_nonfinite=True) raises on every rank
    and changes nothing; then a clip followed by step(closure) is refused; then training goes on."""
    import torch.distributed as dist

    rank, found = dist.get_rank(), {}
    for algorithm in ALGORITHMS:
        model = model_of(algorithm)
        optimizer = shardopt.ShardedOptimizer(model.parameters(), algorithm, **KEYWORDS[algorithm])
        before = flat_params(model)
        with poisoned_backward(model) if rank == 1 else contextlib.nullcontext():
            loss(algorithm, model, rank, 0).backward()
        with pytest.raises(RuntimeError) as error:
            optimizer.clip_grad_norm_(1.0, error_if_nonfinite=True)
        optimizer.zero_grad()
        entry = {"nonfinite": str(error.value), "untouched": torch.equal(flat_params(model), before)}
        loss(algorithm, model, rank, 1).backward()
        optimizer.clip_grad_norm_(1.0)
        with pytest.raises(RuntimeError) as error:
            optimizer.step(lambda algorithm=algorithm, model=model: loss(algorithm, model, rank, 1))
        entry["closure"] = str(error.value)
        optimizer.zero_grad()
        loss(algorithm, model, rank, 2).backward()
        optimizer.step()
        entry["moved"] = not torch.equal(flat_params(model), before)
        found[algorithm] = entry
    return found


def test_a_nonfinite_norm_raises_torchs_error_on_every_rank() -> None:
    inf_grad = nn.Parameter(torch.zeros(2))
    inf_grad.grad = torch.tensor([math.inf, 0.0])
    with pytest.raises(RuntimeError) as torch_error:
        torch.nn.utils.clip_grad_norm_([inf_grad], 1.0, error_if_nonfinite=True)
    for found in run_world(nonfinite_clip_run, 2):
        for algorithm, entry in found.items():
            assert entry["nonfinite"] == str(torch_error.value), algorithm
            assert entry["untouched"], algorithm
            assert "call clip_grad_norm_() inside the closure" in entry["closure"], algorithm
            assert entry["moved"], algorithm


# ---------------------------------------------------------------------- loss scaling


def scaler_run() -> dict[str, dict[str, Any]]:
    import torch.distributed as dist

    rank, world_size, results = dist.get_rank(), dist.get_world_size(), {}
    for algorithm in ALGORITHMS:
        model = model_of(algorithm)
        optimizer = shardopt.ShardedOptimizer(model.parameters(), algorithm, **KEYWORDS[algorithm])
        scaler = shardopt.GradScaler("cpu", **SCALER)
        params, scales = [], []
        for step in range(SCALER_STEPS):
            optimizer.zero_grad()
            scaler.scale(loss(algorithm, model, rank, step)).backward()
            if step == POISONED and rank == world_size - 1:
                poison_first_gradient(model)
            if step == CLIPPED:
                scaler.unscale_(optimizer)
                optimizer.clip_grad_norm_(0.05)
            scaler.step(optimizer)
            scaler.update()
            params.append(flat_params(model))
            scales.append(scaler.get_scale())
        results[algorithm] = {"params": params, "scales": scales, "skipped": optimizer.skipped_steps}
    return results


def scaler_reference(algorithm: str, world_size: int) -> dict[str, Any]:
    """torch.optim with torch.amp.GradScaler on one process, fed the mean of the ranks' scaled gradients."""
    model = model_of(algorithm)
    optimizer = getattr(torch.optim, algorithm)(model.parameters(), **KEYWORDS[algorithm])
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    params, scales = [], []
    for step in range(SCALER_STEPS):
        optimizer.zero_grad()
        for rank in range(world_size):
            (scaler.scale(loss(algorithm, model, rank, step)) / world_size).backward()
        if step == POISONED:
            poison_first_gradient(model)
        if step == CLIPPED:
            scaler.unscale_(optimizer)
            torch_clip(algorithm, model, 0.05, 2.0)
        scaler.step(optimizer)
        scaler.update()
        params.append(flat_params(model))
        scales.append(scaler.get_scale())
    return {"params": params, "scales": scales}


@pytest.mark.parametrize("world_size", [2, 3])
def test_grad_scaler_skips_a_step_on_every_rank_and_matches_torch(world_size: int) -> None:
    per_rank = run_world(scaler_run, world_size)
    for algorithm in ALGORITHMS:
        expected = scaler_reference(algorithm, world_size)
        # torch skipped the poisoned step: the parameters did not move, the scale halved.
        assert torch.equal(expected["params"][POISONED], expected["params"][POISONED - 1]), algorithm
        assert expected["scales"][POISONED] == expected["scales"][POISONED - 1] / 2, algorithm
        for rank, results in enumerate(per_rank):
            ours, where = results[algorithm], f"{algorithm} N={world_size} rank {rank}"
            assert ours["skipped"] == 1, where
            assert ours["scales"] == expected["scales"], where
            assert_trajectories_close(ours["params"], expected["params"], where, **tolerance(algorithm))
            for step, params in enumerate(ours["params"]):
                assert torch.equal(params, per_rank[0][algorithm]["params"][step]), f"{where}: ranks differ at {step}"


def sparse_grads_run() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step, this rank's SparseAdam ``p.grad`` after shardopt.GradScaler's step() (and, at step
    CLIPPED, after its unscale_() first), next to what torch.amp.GradScaler leaves in ``p.grad`` of a
    torch.optim.SparseAdam given the same parameters and this rank's own gradient.

    Every rank's gradient holds an inf at step POISONED, so that torch's scaler (which sees one rank's
    gradient) skips the same steps as shardopt's and the two scales stay equal."""
    import torch.distributed as dist

    rank = dist.get_rank()
    ours, theirs = make_embedding(), make_embedding()
    optimizer = shardopt.SparseAdam(ours.parameters(), lr=0.05)
    reference = torch.optim.SparseAdam(theirs.parameters(), lr=0.05)
    scalers = shardopt.GradScaler("cpu", **SCALER), torch.amp.GradScaler("cpu", **SCALER)
    grads = []
    for step in range(SCALER_STEPS):
        with torch.no_grad():
            theirs.weight.copy_(ours.weight)
        for model, scaler in zip((ours, theirs), scalers):
            model.zero_grad()
            scaler.scale(sparse_loss_of(model, rank, step)).backward()
            if step == POISONED:
                poison_first_gradient(model)
        if step == CLIPPED:
            for target, scaler in zip((optimizer, reference), scalers):
                scaler.unscale_(target)
            grads.append((ours.weight.grad.to_dense(), theirs.weight.grad.to_dense()))
        for target, scaler in zip((optimizer, reference), scalers):
            scaler.step(target)
            scaler.update()
        grads.append((ours.weight.grad.to_dense(), theirs.weight.grad.to_dense()))
    return grads


def test_sparse_adam_p_grad_is_unscaled_as_torchs_grad_scaler_leaves_it() -> None:
    for rank, grads in enumerate(run_world(sparse_grads_run, 2)):
        for index, (ours, theirs) in enumerate(grads):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=f"rank {rank}, p.grad number {index}")


def refusals_run() -> dict[str, str]:
    import torch.distributed as dist

    rank, found = dist.get_rank(), {}
    model = model_of("Muon")
    muon = shardopt.Muon(model.parameters(), lr=0.05)
    plain = torch.amp.GradScaler("cpu")
    plain.scale(loss("Muon", model, rank, 0)).backward()
    with pytest.raises(TypeError) as error:
        plain.step(muon)  # it would judge each rank's own gradients
    found["plain scaler"] = str(error.value)
    half = half_parameter()
    scaler = shardopt.GradScaler("cpu")
    scaler.scale(half.float().square().sum()).backward()
    with pytest.raises(ValueError) as error:
        scaler.step(shardopt.Adafactor([half]))
    found["fp16"] = str(error.value)
    return found


def half_parameter() -> nn.Parameter:
    return nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float16).view(3, 2))


def test_misuse_gets_torchs_or_a_clear_error_on_every_rank() -> None:
    half = half_parameter()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(half.float().square().sum()).backward()
    with pytest.raises(ValueError) as torch_error:
        scaler.step(torch.optim.Adafactor([half]))
    for found in run_world(refusals_run, 2):
        assert "use shardopt.GradScaler" in found["plain scaler"]
        assert found["fp16"] == str(torch_error.value)
