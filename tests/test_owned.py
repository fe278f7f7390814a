"""Adafactor and Muon sharded by whole tensors: each parameter's state and update on one owner rank.

Parity with single-process torch.optim fed the mean gradient at N = 1, 2, 3, for several keyword
combinations, param groups and an lr scheduler; state_dict in torch's format, resumed at another
world size through plain torch.optim; the Muon + AdamW recipe; the balancing; bad input.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import shardopt
from shardopt.owner.assign import assign_owners, update_cost
from tests.common import (
    TinyNet,
    assert_state_dicts_equal,
    assert_trajectories_close,
    flat_params,
    loss_of,
    make_model,
    set_mean_grads,
)
from tests.world import run_world

STEPS = 4
# torch runs Newton-Schulz in bfloat16: a last-bit difference of the reduced gradient (the ranks'
# sum in another order) may round an element of the orthogonalised update one bf16 step apart.
MUON_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


class MatrixNet(nn.Module):
    """Only matrices (Muon takes nothing else): a tall (9, 7), a wide (4, 9) and a (3, 4) one."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(7, 9, bias=False)
        self.second = nn.Linear(9, 4, bias=False)
        self.out = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x)))))


def make(kind: str) -> nn.Module:
    if kind == "matrices":
        torch.manual_seed(0)
        return MatrixNet()
    return make_model()


def halved_lr(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def two_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The first parameter alone with its own lr, the rest with the defaults."""
    params = list(model.parameters())
    return [{"params": params[:1], "lr": 0.03}, {"params": params[1:]}]


# (label, algorithm, keywords, model, param groups, scheduler)
CASES: list[tuple[str, str, dict[str, Any], str, bool, bool]] = [
    ("adafactor-defaults", "Adafactor", {}, "tiny", False, False),
    (
        "adafactor-all-keywords",
        "Adafactor",
        {"lr": 0.05, "beta2_decay": -0.5, "eps": (1e-30, 1e-2), "d": 2.0, "weight_decay": 0.1, "maximize": True},
        "tiny",
        False,
        False,
    ),
    ("adafactor-foreach-groups-scheduler", "Adafactor", {"lr": 0.02, "foreach": True}, "tiny", True, True),
    ("adafactor-tensor-lr", "Adafactor", {"lr": torch.tensor(0.01), "foreach": False}, "matrices", False, False),
    ("muon-defaults", "Muon", {}, "matrices", False, False),
    (
        "muon-plain-momentum",
        "Muon",
        {"lr": 0.02, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
        "matrices",
        False,
        False,
    ),
    (
        "muon-ns-keywords",
        "Muon",
        {"lr": 0.02, "ns_coefficients": (3.0, -3.2, 1.2), "ns_steps": 3, "eps": 1e-5}
        | {"adjust_lr_fn": "match_rms_adamw"},
        "matrices",
        False,
        False,
    ),
    ("muon-groups-scheduler", "Muon", {"lr": 0.05, "adjust_lr_fn": "original"}, "matrices", True, True),
]


def params_of(model: nn.Module, grouped: bool) -> Any:
    return two_groups(model) if grouped else model.parameters()


def sharded_cases() -> list[tuple[list[torch.Tensor], dict[str, Any], dict[str, int]]]:
    import torch.distributed as dist

    rank = dist.get_rank()
    results = []
    for index, (_, algorithm, kwargs, kind, grouped, scheduled) in enumerate(CASES):
        model = make(kind)
        # Each way in: the alias, ShardedOptimizer with the class, ShardedOptimizer with the name.
        if index % 3 == 0:
            optimizer = getattr(shardopt, algorithm)(params_of(model, grouped), **kwargs)
        elif index % 3 == 1:
            optimizer = shardopt.ShardedOptimizer(params_of(model, grouped), getattr(torch.optim, algorithm), **kwargs)
        else:
            optimizer = shardopt.ShardedOptimizer(params_of(model, grouped), algorithm.lower(), **kwargs)
        assert isinstance(optimizer, shardopt.OwnedOptimizer)
        scheduler = halved_lr(optimizer) if scheduled else None
        trajectory = []
        for step in range(STEPS):
            optimizer.zero_grad()
            loss_of(model, rank, step).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            trajectory.append(flat_params(model))
        results.append((trajectory, optimizer.state_dict(), optimizer.memory_stats()))
    return results


def reference(
    algorithm: str,
    kwargs: dict[str, Any],
    kind: str,
    world_sizes: list[int],
    grouped: bool = False,
    scheduled: bool = False,
    start: Callable[[nn.Module, torch.optim.Optimizer], None] | None = None,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """torch.optim on one process, step i fed the mean gradient of ``world_sizes[i]`` ranks."""
    model = make(kind)
    optimizer = getattr(torch.optim, algorithm)(params_of(model, grouped), **kwargs)
    if start is not None:
        start(model, optimizer)
    scheduler = halved_lr(optimizer) if scheduled else None
    trajectory = []
    for step, world_size in enumerate(world_sizes):
        set_mean_grads(model, world_size, step)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        trajectory.append(flat_params(model))
    return trajectory, optimizer.state_dict()


def state_bytes(state_dict: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for entry in state_dict["state"].values() for t in entry.values())


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_parity_with_torch_on_the_mean_gradient(world_size: int) -> None:
    per_rank = run_world(sharded_cases, world_size)
    for case, (label, algorithm, kwargs, kind, grouped, scheduled) in enumerate(CASES):
        expected, expected_state = reference(algorithm, kwargs, kind, [world_size] * STEPS, grouped, scheduled)
        tolerance = MUON_TOLERANCE if algorithm == "Muon" else FP32_TOLERANCE
        label = f"{label} N={world_size}"
        for trajectory, state, _ in (rank[case] for rank in per_rank):
            assert_trajectories_close(trajectory, expected, label, **tolerance)
            assert_state_dicts_equal(state, expected_state, label, **tolerance)
        # Each parameter's state lives on its owner alone: the ranks' state adds up to torch's.
        per_rank_bytes = [rank[case][2]["state_bytes"] for rank in per_rank]
        assert sum(per_rank_bytes) == state_bytes(expected_state), label
        assert all(b < state_bytes(expected_state) for b in per_rank_bytes) or world_size == 1, label


def gradients_missing_run() -> tuple[list[torch.Tensor], list[list[int]]]:
    """Adafactor where out.bias has no gradient on rank 1 and scale none anywhere at step 0."""
    import torch.distributed as dist

    rank = dist.get_rank()
    model = make_model()
    optimizer = shardopt.Adafactor(model.parameters(), lr=0.05)
    trajectory, with_state = [], []
    params = list(model.parameters())
    for step in range(STEPS):
        optimizer.zero_grad()
        # Written into .grad with no backward (which would reduce them then, as DDP does): step() reduces
        # what it finds, a missing gradient counting zero.
        for param, grad in zip(params, torch.autograd.grad(loss_of(model, rank, step), params)):
            param.grad = grad
        drop_grads(model, rank, step)
        optimizer.step()
        trajectory.append(flat_params(model))
        with_state.append(sorted(optimizer.state_dict()["state"]))
    return trajectory, with_state


def drop_grads(model: TinyNet, rank: int, step: int) -> None:
    if rank == 1:
        model.out.bias.grad = None
    if step == 0:
        model.scale.grad = None


def reference_with_missing_grads(world_size: int) -> list[torch.Tensor]:
    model = make_model()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=0.05)
    params = list(model.parameters())
    trajectory = []
    for step in range(STEPS):
        total: list[torch.Tensor | None] = [None] * len(params)
        for rank in range(world_size):
            model.zero_grad(set_to_none=True)
            loss_of(model, rank, step).backward()
            drop_grads(model, rank, step)
            for i, p in enumerate(params):
                if p.grad is not None:
                    total[i] = p.grad.clone() if total[i] is None else total[i] + p.grad
        for p, grad in zip(params, total):
            p.grad = None if grad is None else grad / world_size
        optimizer.step()
        trajectory.append(flat_params(model))
    return trajectory


@pytest.mark.parametrize("world_size", [2, 3])
def test_missing_gradients_count_as_zero_and_none_everywhere_is_not_updated(world_size: int) -> None:
    expected = reference_with_missing_grads(world_size)
    for trajectory, with_state in run_world(gradients_missing_run, world_size):
        assert_trajectories_close(trajectory, expected, f"missing gradients N={world_size}")
        assert with_state[0] == [1, 2, 3, 4], "scale (parameter 0) had no gradient anywhere: no state"
        assert with_state[1] == [0, 1, 2, 3, 4]


def reductions_run() -> dict[str, Any]:
    """p.grad after step() for each grad_reduction, the closure's loss, and a group added later."""
    import torch.distributed as dist

    rank = dist.get_rank()
    results: dict[str, Any] = {}
    for reduction in ("mean", "sum", None):
        model = make_model()
        optimizer = shardopt.Adafactor(model.parameters(), grad_reduction=reduction)

        def closure(model: nn.Module = model) -> torch.Tensor:
            loss = loss_of(model, rank, 0)
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        results[str(reduction)] = ([p.grad.clone() for p in model.parameters()], float(loss))
    model = make("matrices")
    first, *rest = model.parameters()
    optimizer = shardopt.Muon([first], lr=0.02)
    optimizer.add_param_group({"params": rest, "lr": 0.05})
    trajectory = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss_of(model, rank, step).backward()
        optimizer.step()
        trajectory.append(flat_params(model))
    results["added group"] = trajectory
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_grad_reduction_closure_and_added_group(world_size: int) -> None:
    model = make_model()
    set_mean_grads(model, world_size, 0)
    mean = [p.grad.clone() for p in model.parameters()]
    losses = [loss_of(make_model(), rank, 0).item() for rank in range(world_size)]
    matrices = make("matrices")
    first, *rest = matrices.parameters()
    muon = torch.optim.Muon([first], lr=0.02)
    muon.add_param_group({"params": rest, "lr": 0.05})
    expected = []
    for step in range(STEPS):
        set_mean_grads(matrices, world_size, step)
        muon.step()
        expected.append(flat_params(matrices))
    for rank, results in enumerate(run_world(reductions_run, world_size)):
        for reduction, scale in (("mean", 1), ("sum", world_size)):
            grads, loss = results[reduction]
            torch.testing.assert_close(grads, [g * scale for g in mean], msg=f"grad_reduction={reduction}")
            assert loss == pytest.approx(sum(losses) / world_size), "the closure's loss, averaged over ranks"
        own_model = make_model()
        loss_of(own_model, rank, 0).backward()
        assert all(torch.equal(a, p.grad) for a, p in zip(results["None"][0], own_model.parameters()))
        assert_trajectories_close(results["added group"], expected, "add_param_group", **MUON_TOLERANCE)


RESUME = ("Muon", {"lr": 0.02, "momentum": 0.9}, "matrices")


def first_half(world_size_steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch.distributed as dist

    rank = dist.get_rank()
    algorithm, kwargs, kind = RESUME
    model = make(kind)
    optimizer = getattr(shardopt, algorithm)(model.parameters(), **kwargs)
    for step in range(world_size_steps):
        optimizer.zero_grad()
        loss_of(model, rank, step).backward()
        optimizer.step()
    return model.state_dict(), optimizer.state_dict()


def second_half(
    model_state: dict[str, Any], optimizer_state: dict[str, Any], first_steps: int
) -> tuple[list[torch.Tensor], str]:
    import torch.distributed as dist

    rank = dist.get_rank()
    algorithm, kwargs, kind = RESUME
    model = make(kind)
    model.load_state_dict(model_state)
    optimizer = getattr(shardopt, algorithm)(model.parameters(), **kwargs)
    # A dict for another model is refused before anything changes, naming the mismatch.
    wrong = {"state": {0: {"momentum_buffer": torch.zeros(2, 2)}}, "param_groups": optimizer_state["param_groups"]}
    with pytest.raises(ValueError) as error:
        optimizer.load_state_dict(wrong)
    assert optimizer.state_dict()["state"] == {}
    optimizer.load_state_dict(optimizer_state)
    trajectory = []
    for step in range(first_steps, first_steps + STEPS):
        optimizer.zero_grad()
        loss_of(model, rank, step).backward()
        optimizer.step()
        trajectory.append(flat_params(model))
    return trajectory, str(error.value)


def test_state_dict_round_trip_through_torch_to_another_world_size() -> None:
    algorithm, kwargs, kind = RESUME
    first_steps = 3
    model_state, saved = run_world(first_half, 2, first_steps)[0]
    # Plain torch.optim takes the dict and gives it back unchanged.
    model = make(kind)
    model.load_state_dict(model_state)
    plain = getattr(torch.optim, algorithm)(model.parameters(), **kwargs)
    plain.load_state_dict(saved)
    through_torch = plain.state_dict()
    expected, _ = reference(algorithm, kwargs, kind, [2] * first_steps + [3] * STEPS)
    for trajectory, error in run_world(second_half, 3, model_state, through_torch, first_steps):
        assert_trajectories_close(trajectory, expected[first_steps:], "N=2 -> torch.optim -> N=3", **MUON_TOLERANCE)
        assert "loaded optimizer state 'momentum_buffer' of parameter 0 of param group 0 has shape (2, 2)" in error


def recipe_run() -> list[torch.Tensor]:
    """The Muon + AdamW recipe: Muon for the matrices, AdamW for the rest, two optimizers in one job."""
    import torch.distributed as dist

    rank = dist.get_rank()
    model = make_model()
    matrices = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    muon = shardopt.Muon(matrices, lr=0.02)
    adamw = shardopt.AdamW(rest, lr=1e-2, weight_decay=0.01)
    trajectory = []
    for step in range(STEPS):
        muon.zero_grad()
        adamw.zero_grad()
        loss_of(model, rank, step).backward()
        muon.step()
        adamw.step()
        trajectory.append(flat_params(model))
    return trajectory


def recipe_reference(world_size: int) -> list[torch.Tensor]:
    model = make_model()
    muon = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.ndim != 2], lr=1e-2, weight_decay=0.01)
    trajectory = []
    for step in range(STEPS):
        set_mean_grads(model, world_size, step)
        muon.step()
        adamw.step()
        trajectory.append(flat_params(model))
    return trajectory


@pytest.mark.parametrize("world_size", [2, 3])
def test_muon_for_matrices_and_adamw_for_the_rest(world_size: int) -> None:
    expected = recipe_reference(world_size)
    for trajectory in run_world(recipe_run, world_size):
        assert_trajectories_close(trajectory, expected, f"Muon + AdamW N={world_size}", **MUON_TOLERANCE)


# ---------------------------------------------------------------------- balancing (pure)


@pytest.mark.parametrize("seed", range(20))
def test_every_parameter_has_one_owner_and_the_work_is_balanced(seed: int) -> None:
    rng = random.Random(seed)
    world_size = rng.randint(1, 6)
    costs = [rng.choice([0, 1, 7, 64, 1000, rng.randint(1, 10**6)]) for _ in range(rng.randint(0, 40))]
    owners = assign_owners(costs, world_size)
    assert len(owners) == len(costs) and all(0 <= owner < world_size for owner in owners)
    loads = [sum(c for c, o in zip(costs, owners) if o == rank) for rank in range(world_size)]
    assert max(loads) - min(loads) <= max(costs, default=0)
    assert assign_owners(costs, world_size) == owners  # deterministic: every rank computes the same
    # A later group continues from the loads so far.
    more = [rng.randint(1, 1000) for _ in range(10)]
    later = assign_owners(more, world_size, loads)
    totals = [load + sum(c for c, o in zip(more, later) if o == rank) for rank, load in enumerate(loads)]
    assert max(totals) - min(totals) <= max(costs + more)


def test_owners_follow_the_update_cost() -> None:
    assert update_cost("Adafactor", (30, 40)) == 1200
    assert update_cost("Muon", (30, 40)) == 30 * 40 * 30  # Newton-Schulz: m * n * min(m, n)
    # Largest first: the big matrix alone on one rank, the small ones together on the other.
    costs = [update_cost("Muon", shape) for shape in [(8, 8), (64, 64), (8, 8), (8, 8)]]
    assert assign_owners(costs, 2) == [1, 0, 1, 1]


# ---------------------------------------------------------------------- bad input (one process)


def test_muon_refuses_parameters_that_are_not_matrices_with_torchs_error() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="Muon only supports 2D parameters whereas we found a parameter with size"):
        shardopt.Muon(model.parameters())
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        shardopt.ShardedOptimizer(model.parameters(), "muon")
    optimizer = shardopt.Muon([model.hidden.weight])
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        optimizer.add_param_group({"params": [model.hidden.bias]})
    assert len(optimizer.param_groups) == 1


def test_bad_keywords_raise_torchs_errors_naming_them() -> None:
    params = list(make("matrices").parameters())
    for build, error, message in [
        (lambda: shardopt.Muon(params, lr=-1.0), ValueError, "Learning rate should be >= 0 but is: -1.0"),
        (lambda: shardopt.Muon(params, momentum=-0.5), ValueError, "momentum should be >= 0 but is: -0.5"),
        (lambda: shardopt.Muon(params, adjust_lr_fn="x"), ValueError, "Adjust learning rate function x"),
        (lambda: shardopt.Adafactor(params, beta2_decay=0.5), ValueError, "beta2_decay should be <= 0"),
        (lambda: shardopt.Adafactor(params, d=0.5), ValueError, "Clipping threshold d should be >= 1"),
        (lambda: shardopt.Muon(params, stage=1), TypeError, "unexpected keyword argument 'stage'.*takes: lr"),
        (lambda: shardopt.Adafactor(params, grad_reduction="avg"), ValueError, "grad_reduction must be"),
        (lambda: shardopt.OwnedOptimizer(params, torch.optim.Adam), TypeError, "Adafactor, Muon"),
    ]:
        with pytest.raises(error, match=message):
            build()


def test_world_of_one_without_a_process_group_equals_torch() -> None:
    """No torch.distributed at all: the plain single-process path."""
    expected, expected_state = reference("Adafactor", {"lr": 0.05}, "tiny", [1] * STEPS)
    model = make_model()
    optimizer = shardopt.Adafactor(model.parameters(), lr=0.05)
    trajectory = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss_of(model, 0, step).backward()
        optimizer.step()
        trajectory.append(flat_params(model))
    assert_trajectories_close(trajectory, expected, "Adafactor N=1 without a process group")
    assert_state_dicts_equal(optimizer.state_dict(), expected_state, "Adafactor N=1 without a process group")
    assert (optimizer.rank, optimizer.world_size) == (0, 1)
