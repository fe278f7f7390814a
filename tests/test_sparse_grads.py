"""Sparse gradients for SGD and Adagrad inside ShardedOptimizer.

Parity with single-process torch.optim fed the mean gradient (the ranks' sparse gradients summed,
divided by N and coalesced; the dense ones averaged) at N = 1, 2, 3 and stages 1 and 2, for the
keywords torch takes with sparse gradients, on a model that mixes a sparse embedding (whose rows
the shard boundaries cut) with a dense layer, one rank's batch missing the embedding at a step;
clip_grad_norm_ under shardopt.GradScaler; the state dict in torch's format and a resume from
torch's (sparse momentum buffer); the gradient bytes on the wire follow the touched rows, not the
table; torch's own error, on every rank, where a keyword rules sparse gradients out; a parameter
sparse on one rank and dense on another; the entry arithmetic for any sparse dim.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import shardopt
from shardopt.collectives.span import Span
from shardopt.elements.sparse_grads import add_entries, dense_ranges
from tests.test_sparse import DIM, Recommender, added, batch
from tests.test_sparse import recommender_loss as loss_of
from tests.world import run_world

# The model: an embedding of 11 rows of 4 (the shards of 2 or 3 ranks cut rows) and a dense head, in
# one flat buffer; each rank's batch shares rows with the others', has its own, repeats one.
STEPS = 3
BIG_ROWS = 300  # for the bytes on the wire; a multiple of 3 keeps the padding of N = 2, 3 alike when doubled
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
CLIPPED, MAX_NORM = {"lr": 0.1, "momentum": 0.9}, 0.05
CLASSES = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}

# (label, algorithm, keywords, grad_reduction): every keyword torch takes with sparse gradients.
CASES: list[tuple[str, str, dict[str, Any], str | None]] = [
    ("sgd", "sgd", {"lr": 0.1}, "mean"),
    ("sgd-momentum", "sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "maximize": True}, "mean"),
    ("sgd-nesterov", "sgd", {"lr": torch.tensor(0.1), "momentum": 0.8, "nesterov": True, "foreach": True}, "sum"),
    ("adagrad", "adagrad", {"lr": 0.1}, "mean"),
    (
        "adagrad-all",
        "adagrad",
        {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.2, "eps": 1e-6, "maximize": True},
        None,
    ),
]


def loss_at(model: Recommender, rank: int, step: int, world_size: int) -> torch.Tensor:
    """The loss of ``rank``'s batch; at step 1 the last of several ranks does not touch the embedding
    (no gradient for it there: the others' entries make the mean)."""
    if step == 1 and rank == world_size - 1 > 0:
        return torch.tanh(model.head(torch.ones(DIM))).pow(2).sum()
    return loss_of(model, rank, step)


def reduced_grads(model: Recommender, world_size: int, step: int, reduction: str | None) -> list[torch.Tensor]:
    """Each parameter's gradient summed over the ranks (divided by N but for "sum"); sparse ones coalesced."""
    per_rank = []
    for rank in range(world_size):
        model.zero_grad(set_to_none=True)
        loss_at(model, rank, step, world_size).backward()
        per_rank.append([p.grad for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    reduced = []
    for grads in zip(*per_rank):
        total = added([grad for grad in grads if grad is not None])
        total = total / world_size if reduction != "sum" else total
        reduced.append(total.coalesce() if total.is_sparse else total)
    return reduced


def reference(
    algorithm: str, keywords: dict[str, Any], reduction: str | None, world_size: int, steps: int = STEPS
) -> tuple[list[list[torch.Tensor]], dict[str, Any]]:
    """torch.optim on one process, fed the reduced gradients of ``world_size`` ranks."""
    model = Recommender()
    optimizer = CLASSES[algorithm](model.parameters(), **keywords)
    trajectory = []
    for step in range(steps):
        for param, grad in zip(model.parameters(), reduced_grads(model, world_size, step, reduction)):
            param.grad = grad
        optimizer.step()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory, optimizer.state_dict()


def train(model: Recommender, optimizer: Any, steps: range, reduction: str | None) -> list[list[torch.Tensor]]:
    """This rank's steps; with reduction None every rank feeds the already reduced (mean) gradients."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    trajectory = []
    for step in steps:
        if reduction is None:
            for param, grad in zip(model.parameters(), reduced_grads(model, world_size, step, "mean")):
                param.grad = grad
        else:
            loss_at(model, rank, step, world_size).backward()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory


def assert_state_equal(ours: dict[str, Any], theirs: dict[str, Any], label: str) -> None:
    """Same groups and state keys; torch's sparse momentum buffer equals our dense one."""
    assert ours["param_groups"] == theirs["param_groups"], label
    assert ours["state"].keys() == theirs["state"].keys(), label
    for index, entry in theirs["state"].items():
        assert list(ours["state"][index]) == list(entry), f"{label}: keys of parameter {index}"
        for name, value in entry.items():
            expected = value.to_dense() if value.is_sparse else value
            torch.testing.assert_close(ours["state"][index][name], expected, **TOLERANCE, msg=f"{label}: {name}")


# ---------------------------------------------------------------- the entry arithmetic


def test_entries_of_any_sparse_dim_land_in_the_window_they_fall_in() -> None:
    """A (3, 2, 5) parameter with sparse_dim 2, duplicate entries, every window of its 30 elements:
    the window holds exactly those elements of the densified gradient."""
    torch.manual_seed(0)
    shape = (3, 2, 5)
    indices = torch.tensor([[0, 2, 1, 2, 0], [1, 0, 1, 0, 1]])
    values = torch.randn(5, 5)
    dense = torch.sparse_coo_tensor(indices, values, shape, check_invariants=True).to_dense().view(-1)
    for start in range(31):
        for end in range(start, 31, 7):
            window = torch.zeros(end - start)
            add_entries(window, Span(start, end), shape, indices, values)
            torch.testing.assert_close(window, dense[start:end], msg=f"window [{start}, {end})")


def test_dense_ranges_leave_out_the_sparse_slots() -> None:
    model = Recommender()
    optimizer = shardopt.SGD(model.parameters(), lr=0.1)
    layout = optimizer.buffers[0].layout
    embedding, weight, bias = (slot.span for slot in layout.slots)
    assert dense_ranges(layout.slots, {0}, layout.numel) == [Span(embedding.end, layout.numel)]
    assert dense_ranges(layout.slots, {1}, layout.numel) == [Span(0, weight.start), Span(weight.end, layout.numel)]
    assert dense_ranges(layout.slots, {0, 1, 2}, layout.numel) == [Span(bias.end, layout.numel)] * (
        bias.end < layout.numel
    )


# ---------------------------------------------------------------- parity on N ranks


def recording(optimizer: Any) -> list[tuple[str, int]]:
    """Record (what, elements) of every collective ``optimizer`` issues from now on."""
    comm, issued = optimizer._comm, []
    for name in ("all_reduce_", "reduce_scatter", "all_gather"):
        collective = getattr(comm, name)

        def record(tensor: torch.Tensor, *args: Any, collective: Any = collective, **kwargs: Any) -> Any:
            issued.append((args[-1], tensor.numel()))
            return collective(tensor, *args, **kwargs)

        setattr(comm, name, record)
    return issued


def gradient_traffic(rows: int, stage: int) -> list[tuple[str, int]]:
    """The collectives of steps 2 and 3 of a table of ``rows`` rows (step 1 learns which parameters are
    sparse), but the all-gather of the updated parameters."""
    model = Recommender()
    model.embedding = nn.Embedding(rows, DIM, sparse=True)
    optimizer = shardopt.Adagrad(model.parameters(), lr=0.1, stage=stage)
    train(model, optimizer, range(1), "mean")
    issued = recording(optimizer)
    train(model, optimizer, range(1, 3), "mean")
    return [(what, n) for what, n in issued if what != "the all-gather of updated parameters"]


def clipped_and_scaled(stage: int) -> tuple[list[list[torch.Tensor]], list[float]]:
    """Steps through shardopt.GradScaler, unscaled and clipped before the update: the trajectory and norms."""
    rank = dist.get_rank()
    model = Recommender()
    optimizer = shardopt.SGD(model.parameters(), stage=stage, **CLIPPED)
    scaler = shardopt.GradScaler("cpu")
    trajectory, norms = [], []
    for step in range(STEPS):
        scaler.scale(loss_at(model, rank, step, dist.get_world_size())).backward()
        scaler.unscale_(optimizer)
        norms.append(float(optimizer.clip_grad_norm_(MAX_NORM)))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory, norms


def sharded_cases() -> dict[str, Any]:
    results: dict[str, Any] = {}
    for label, algorithm, keywords, reduction in CASES:
        for stage in (1, 2):
            model = Recommender()
            optimizer = shardopt.ShardedOptimizer(
                model.parameters(), algorithm, stage=stage, grad_reduction=reduction, **keywords
            )
            trajectory = train(model, optimizer, range(STEPS), reduction)
            results[label, stage] = (trajectory, optimizer.state_dict())
    for stage in (1, 2):
        results["clipped", stage] = clipped_and_scaled(stage)
    if dist.get_world_size() > 1:
        for stage in (1, 2):
            results["traffic", stage] = [gradient_traffic(rows, stage) for rows in (BIG_ROWS, 2 * BIG_ROWS)]
    return results


@functools.cache
def sharded_results(world_size: int) -> list[dict[str, Any]]:
    return run_world(sharded_cases, world_size)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize(("label", "algorithm", "keywords", "reduction"), CASES, ids=[case[0] for case in CASES])
def test_parity_with_torch_on_the_mean_gradient(
    label: str, algorithm: str, keywords: dict[str, Any], reduction: str | None, world_size: int
) -> None:
    expected, expected_state = reference(algorithm, keywords, reduction, world_size)
    for rank, results in enumerate(sharded_results(world_size)):
        for stage in (1, 2):
            trajectory, state = results[label, stage]
            where = f"{label} N={world_size} stage {stage} rank {rank}"
            for step, (ours, theirs) in enumerate(zip(trajectory, expected, strict=True)):
                for name, a, b in zip(("embedding", "weight", "bias"), ours, theirs, strict=True):
                    torch.testing.assert_close(a, b, **TOLERANCE, msg=f"{where} step {step} {name}")
            assert_state_equal(state, expected_state, where)


@pytest.mark.parametrize("world_size", [2, 3])
def test_gradient_bytes_follow_the_touched_rows_not_the_table(world_size: int) -> None:
    """A table twice as large issues the same gradient collectives, of the same sizes; the entries'
    all-gather is N parts of the most entries (rows) a rank's batch touched."""
    entries = max(len(torch.unique(batch(rank, step))) for rank in range(world_size) for step in (1, 2))
    for results in sharded_results(world_size):
        for stage in (1, 2):
            small, large = results["traffic", stage]
            assert small == large, f"stage {stage}: {small} != {large}"
            values = [n for what, n in small if what == "the all-gather of sparse gradient values"]
            assert values and max(values) == world_size * entries * DIM


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_clipping_and_loss_scaling_see_the_sparse_rows(world_size: int) -> None:
    """clip_grad_norm_ under shardopt.GradScaler: the norm of the mean gradient, sparse rows included,
    and torch's step on the clipped mean gradient."""
    model = Recommender()
    optimizer = torch.optim.SGD(model.parameters(), **CLIPPED)
    expected, expected_norms = [], []
    for step in range(STEPS):
        grads = reduced_grads(model, world_size, step, "mean")
        norm = torch.nn.utils.get_total_norm([g.values() if g.is_sparse else g for g in grads])
        for param, grad in zip(model.parameters(), grads):
            param.grad = grad * torch.clamp(MAX_NORM / (norm + 1e-6), max=1.0)
        optimizer.step()
        expected.append([p.detach().clone() for p in model.parameters()])
        expected_norms.append(float(norm))
    assert min(expected_norms) > MAX_NORM  # every step clips
    for rank, results in enumerate(sharded_results(world_size)):
        for stage in (1, 2):
            trajectory, norms = results["clipped", stage]
            where = f"N={world_size} stage {stage} rank {rank}"
            torch.testing.assert_close(norms, expected_norms, **TOLERANCE, msg=where)
            for step, (ours, theirs) in enumerate(zip(trajectory, expected, strict=True)):
                for a, b in zip(ours, theirs, strict=True):
                    torch.testing.assert_close(a, b, **TOLERANCE, msg=f"{where} step {step}")


# ---------------------------------------------------------------- resume from torch's state dict


def resumed_from_torch(saved: dict[str, Any], model_state: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
    model = Recommender()
    model.load_state_dict(model_state)
    optimizer = shardopt.SGD(model.parameters(), lr=0.5, momentum=0.5)
    optimizer.load_state_dict(saved)
    return train(model, optimizer, range(2, STEPS), "mean")


def test_resume_from_torchs_sparse_momentum_buffer() -> None:
    keywords = {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "maximize": True}
    expected, _ = reference("sgd", keywords, "mean", 2)
    model = Recommender()
    plain = torch.optim.SGD(model.parameters(), **keywords)
    for step in range(2):
        for param, grad in zip(model.parameters(), reduced_grads(model, 2, step, "mean")):
            param.grad = grad
        plain.step()
    assert plain.state_dict()["state"][0]["momentum_buffer"].is_sparse
    for rank, trajectory in enumerate(run_world(resumed_from_torch, 2, plain.state_dict(), model.state_dict())):
        for ours, theirs in zip(trajectory, expected[2:], strict=True):
            for a, b in zip(ours, theirs, strict=True):
                torch.testing.assert_close(a, b, **TOLERANCE, msg=f"rank {rank}")


# ---------------------------------------------------------------- errors on every rank


def torch_error(algorithm: type[torch.optim.Optimizer], keywords: dict[str, Any]) -> str:
    """What torch.optim raises for a sparse gradient with ``keywords``."""
    model = Recommender()
    optimizer = algorithm(model.parameters(), **keywords)
    loss_of(model, 0, 0).backward()
    with pytest.raises(RuntimeError) as error:
        optimizer.step()
    return str(error.value)


REFUSED = [
    ("sgd", {"weight_decay": 0.1}),
    ("sgd", {"fused": True}),
    ("adagrad", {"weight_decay": 0.1}),
    ("adagrad", {"fused": True}),
    ("adagrad", {"eps": 0.0}),
    ("adam", {}),
]


def step_error(model: Recommender, optimizer: Any) -> tuple[str, bool]:
    """The error step() raised, and whether the parameters are as they were."""
    before = [p.detach().clone() for p in model.parameters()]
    try:
        optimizer.step()
        message = "no error"
    except RuntimeError as error:
        message = str(error)
    optimizer.zero_grad()
    return message, all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def refusals() -> dict[str, tuple[str, bool]]:
    rank, results = dist.get_rank(), {}
    for algorithm, keywords in REFUSED:
        model = Recommender()
        optimizer = shardopt.ShardedOptimizer(model.named_parameters(), algorithm, **keywords)
        loss_of(model, rank, 0).backward()
        results[f"{algorithm} {keywords}"] = step_error(model, optimizer)
    model = Recommender()
    optimizer = shardopt.SGD(model.named_parameters(), lr=0.1)
    if rank == 0:
        loss_of(model, rank, 0).backward()
    else:  # dense gradients, written without a backward
        for param in model.parameters():
            param.grad = torch.ones_like(param)
    results["mixed"] = step_error(model, optimizer)
    train(model, optimizer, range(1), "mean")  # the embedding's gradients are known to be sparse now
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    results["dense after sparse"] = step_error(model, optimizer)
    return results


def test_refusals_are_torchs_own_errors_on_every_rank() -> None:
    expected = {
        f"{algorithm} {keywords}": torch_error(CLASSES[algorithm], keywords)
        for algorithm, keywords in REFUSED
        if algorithm in CLASSES and keywords != {"eps": 0.0}
    }
    for rank, results in enumerate(run_world(refusals, 2)):
        for key, message in expected.items():
            assert results[key] == (message, True), f"rank {rank} {key}"
        eps, unchanged = results["adagrad {'eps': 0.0}"]
        assert "takes only with eps > 0 or initial_accumulator_value > 0" in eps and unchanged
        adam, unchanged = results["adam {}"]
        assert (
            adam
            == "parameter 0 ('embedding.weight') of param group 0 has a sparse gradient; Adam takes dense gradients"
        )
        assert unchanged
        mixed, unchanged = results["mixed"]
        assert "'embedding.weight') of param group 0 has a sparse gradient on 1 rank(s) and a dense one on 1" in mixed
        assert unchanged
        dense, unchanged = results["dense after sparse"]
        assert "'embedding.weight') of param group 0 has a dense gradient after sparse ones" in dense and unchanged
