"""SparseAdam sharded by rows: each rank keeps the state of its rows of every parameter.

Parity with single-process torch.optim.SparseAdam fed the mean sparse gradient at N = 1, 2, 3, for
several keyword combinations and reductions, on an embedding whose row count N does not divide, with
rows never touched, repeated indices, and ranks touching overlapping and disjoint rows; state_dict in
torch's format, resumed through plain torch.optim at another world size; the bytes exchanged follow
the touched rows, not the table; torch's error for a dense gradient on every rank; SparseAdam with
AdamW in one job; the row arithmetic; bad input.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import shardopt
from shardopt.rows.optimizer import DENSE_GRADIENT_ERROR, SparseRowOptimizer
from shardopt.shared.rows import entries_in, row_ranges, touched_rows
from tests.world import run_world

ROWS, DIM, STEPS = 11, 4, 4  # 11 rows: no world size of 2 or 3 divides them
BIG_ROWS = 1000  # for the bytes on the wire: a batch touches a few rows of it
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}

# (label, keywords, grad_reduction)
CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("defaults", {}, "mean"),
    ("all-keywords", {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "maximize": True}, "mean"),
    ("sum", {"lr": 0.02}, "sum"),
    ("already-reduced", {"lr": 0.02}, None),
]


def make_embedding(rows: int = ROWS, seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(rows, DIM, sparse=True)


def batch(rank: int, step: int) -> torch.Tensor:
    """Rows 0-2 are shared by every rank (overlapping), 3 + rank is this rank's own (disjoint), one row
    repeats within the batch; rows 9 and 10 are never touched."""
    shared = step % 3
    return torch.tensor([shared, shared, 3 + rank, 6 + (rank + step) % 3])


def loss_of(embedding: nn.Embedding, rank: int, step: int) -> torch.Tensor:
    return torch.tanh(embedding(batch(rank, step))).sum() * (rank + 1)


def rank_grad(embedding: nn.Embedding, rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s sparse gradient at ``step``, computed in this process."""
    embedding.zero_grad(set_to_none=True)
    loss_of(embedding, rank, step).backward()
    grad = embedding.weight.grad
    embedding.weight.grad = None
    return grad


def added(grads: list[torch.Tensor]) -> torch.Tensor:
    """The sum of ``grads`` (sparse ones too: ``sum`` would start from a dense 0)."""
    total = grads[0]
    for grad in grads[1:]:
        total = total + grad
    return total


def reduced_grad(embedding: nn.Embedding, world_size: int, step: int, reduction: str | None) -> torch.Tensor:
    """The ranks' sparse gradients summed (divided by N for "mean"), then coalesced."""
    total = added([rank_grad(embedding, rank, step) for rank in range(world_size)])
    return (total / world_size if reduction != "sum" else total).coalesce()


def reference(
    keywords: dict[str, Any], reduction: str | None, world_sizes: list[int]
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """torch.optim.SparseAdam on one process, step k fed the reduced gradient of world_sizes[k] ranks."""
    embedding = make_embedding()
    optimizer = torch.optim.SparseAdam(embedding.parameters(), **keywords)
    trajectory = []
    for step, world_size in enumerate(world_sizes):
        embedding.weight.grad = reduced_grad(embedding, world_size, step, reduction)
        optimizer.step()
        trajectory.append(embedding.weight.detach().clone())
    return trajectory, optimizer.state_dict()


def assert_sparse_adam_state_equal(ours: dict[str, Any], theirs: dict[str, Any], label: str) -> None:
    """Same groups, same parameters with state, same keys; equal steps (ints, as torch keeps them), close moments."""
    assert ours["param_groups"] == theirs["param_groups"], label
    assert ours["state"].keys() == theirs["state"].keys(), label
    for index, entry in theirs["state"].items():
        assert list(ours["state"][index]) == list(entry), f"{label}: keys of parameter {index}"
        assert type(ours["state"][index]["step"]) is int and ours["state"][index]["step"] == entry["step"], label
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours["state"][index][name], entry[name], **TOLERANCE, msg=f"{label}: {name}")


def train(embedding: nn.Embedding, optimizer: Any, steps: range, reduction: str | None) -> list[torch.Tensor]:
    """This rank's steps; with reduction None every rank feeds the already reduced (mean) gradient."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    trajectory = []
    for step in steps:
        if reduction is None:
            embedding.weight.grad = reduced_grad(embedding, world_size, step, "mean")
        else:
            loss_of(embedding, rank, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(embedding.weight.detach().clone())
    return trajectory


# ---------------------------------------------------------------- the row arithmetic


def test_row_ranges_cover_the_rows_in_order() -> None:
    assert row_ranges(11, 3) == [range(0, 4), range(4, 8), range(8, 11)]
    assert row_ranges(11, 1) == [range(0, 11)]
    assert row_ranges(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]


def test_entries_in_a_range_are_shifted_and_touched_rows_split_by_owner() -> None:
    indices = torch.tensor([[5, 1, 7, 5, 4]])
    values = torch.arange(5.0).view(5, 1)
    mine, mine_values = entries_in(indices, values, range(4, 8))
    assert mine.tolist() == [[1, 3, 1, 0]] and mine_values.view(-1).tolist() == [0.0, 2.0, 3.0, 4.0]
    assert [t.tolist() for t in touched_rows(indices[0], row_ranges(8, 2))] == [[1], [4, 5, 7]]


# ---------------------------------------------------------------- parity on N ranks


def sharded_cases() -> dict[str, Any]:
    """Every case of CASES on this world, and the sizes of every all-gather a big table's steps issue."""
    results: dict[str, Any] = {}
    for label, keywords, reduction in CASES:
        embedding = make_embedding()
        optimizer = shardopt.SparseAdam(embedding.parameters(), grad_reduction=reduction, **keywords)
        trajectory = train(embedding, optimizer, range(STEPS), reduction)
        results[label] = (trajectory, optimizer.state_dict(), optimizer.memory_stats())
    # The bytes on the wire: record every all-gather's size while a big table trains.
    embedding = make_embedding(BIG_ROWS)
    optimizer = SparseRowOptimizer(embedding.parameters())
    sizes: list[int] = []
    all_gather = optimizer._comm.all_gather

    def recording(full: torch.Tensor, shard: torch.Tensor, what: str) -> Any:
        sizes.append(full.numel())
        return all_gather(full, shard, what)

    optimizer._comm.all_gather = recording  # type: ignore[method-assign]
    train(embedding, optimizer, range(STEPS), "mean")
    results["all-gather sizes"] = sizes
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_parity_with_torch_on_the_mean_gradient(world_size: int) -> None:
    per_rank = run_world(sharded_cases, world_size)
    for label, keywords, reduction in CASES:
        expected, expected_state = reference(keywords, reduction, [world_size] * STEPS)
        reference_bytes = sum(
            entry[n].numel() * 4 for entry in expected_state["state"].values() for n in ("exp_avg", "exp_avg_sq")
        )
        state_bytes = []
        for rank, results in enumerate(per_rank):
            trajectory, state, memory = results[label]
            where = f"{label} N={world_size} rank {rank}"
            for step, (ours, theirs) in enumerate(zip(trajectory, expected, strict=True)):
                torch.testing.assert_close(ours, theirs, **TOLERANCE, msg=f"{where} step {step}")
            assert_sparse_adam_state_equal(state, expected_state, where)
            state_bytes.append(memory["state_bytes"])
        # exp_avg and exp_avg_sq of this rank's rows: they add up to torch's, none more than a row over 1/N.
        assert sum(state_bytes) == 2 * ROWS * DIM * 4 == reference_bytes
        assert max(state_bytes) <= 2 * -(-ROWS // world_size) * DIM * 4
    if world_size > 1:
        # The counts, then N parts of indices and values (a batch's 4 entries each) and of updated rows
        # (one owner may update every rank's entries: N x 4 rows of DIM): all far below the table.
        most = world_size * world_size * len(batch(0, 0)) * DIM
        for sizes in (results["all-gather sizes"] for results in per_rank):
            assert sizes and max(sizes) <= most < BIG_ROWS * DIM


# ---------------------------------------------------------------- state dict, resumed elsewhere


def first_half(steps: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    embedding = make_embedding()
    optimizer = shardopt.ShardedOptimizer(embedding.parameters(), torch.optim.SparseAdam, lr=0.05)
    train(embedding, optimizer, range(steps), "mean")
    return embedding.state_dict(), optimizer.state_dict()


def second_half(
    model_state: dict[str, torch.Tensor], saved: dict[str, Any], steps: range
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    embedding = make_embedding()
    embedding.load_state_dict(model_state)
    optimizer = shardopt.ShardedOptimizer(embedding.parameters(), "sparseadam", lr=0.01)
    optimizer.load_state_dict(saved)
    return train(embedding, optimizer, steps, "mean"), optimizer.state_dict()


def test_state_dict_round_trip_through_torch_to_another_world_size() -> None:
    """2 steps on 2 ranks, 1 step of plain torch.optim.SparseAdam, 2 steps on 3 ranks: one trajectory."""
    expected, expected_state = reference({"lr": 0.05}, "mean", [2, 2, 3, 3, 3])
    model_state, saved = run_world(first_half, 2, 2)[0]
    embedding = make_embedding()
    embedding.load_state_dict(model_state)
    plain = torch.optim.SparseAdam(embedding.parameters(), lr=0.01)
    plain.load_state_dict(saved)
    assert plain.param_groups[0]["lr"] == 0.05
    embedding.weight.grad = reduced_grad(embedding, 3, 2, "mean")
    plain.step()
    torch.testing.assert_close(embedding.weight.detach(), expected[2], **TOLERANCE)
    for rank, (trajectory, state) in enumerate(
        run_world(second_half, 3, embedding.state_dict(), plain.state_dict(), range(3, 5))
    ):
        for ours, theirs in zip(trajectory, expected[3:], strict=True):
            torch.testing.assert_close(ours, theirs, **TOLERANCE, msg=f"rank {rank}")
        assert_sparse_adam_state_equal(state, expected_state, f"rank {rank}")


# ---------------------------------------------------------------- errors on every rank


def dense_gradient_run() -> tuple[str, bool, str]:
    """A dense gradient on rank 0 only; then a state dict for another model."""
    rank = dist.get_rank()
    embedding = make_embedding()
    optimizer = shardopt.SparseAdam(embedding.parameters())
    before = embedding.weight.detach().clone()
    loss_of(embedding, rank, 0).backward()
    if rank == 0:
        embedding.weight.grad = embedding.weight.grad.to_dense()
    try:
        optimizer.step()
        dense = "no error"
    except RuntimeError as error:
        dense = str(error)
    untouched = torch.equal(before, embedding.weight) and not optimizer.shard_state
    wrong = {"state": {0: {"step": 1, "exp_avg": torch.zeros(3, DIM), "exp_avg_sq": torch.zeros(3, DIM)}}}
    wrong["param_groups"] = optimizer.state_dict()["param_groups"]
    try:
        optimizer.load_state_dict(wrong)
        mismatch = "no error"
    except ValueError as error:
        mismatch = str(error)
    return dense, untouched and not optimizer.shard_state, mismatch


def test_a_dense_gradient_gets_torchs_error_on_every_rank() -> None:
    for dense, untouched, mismatch in run_world(dense_gradient_run, 2):
        assert dense == DENSE_GRADIENT_ERROR and untouched
        assert "has shape (3, 4) but SparseAdam keeps (11, 4) for this parameter" in mismatch


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        shardopt.SparseAdam(make_embedding().parameters(), lr=-1)
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: 1\.0"):
        shardopt.ShardedOptimizer(make_embedding().parameters(), torch.optim.SparseAdam, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Invalid epsilon value: 0"):
        shardopt.SparseAdam(make_embedding().parameters(), eps=0)
    with pytest.raises(ValueError, match="0-dimensional; SparseAdam is sharded by rows"):
        shardopt.SparseAdam([nn.Parameter(torch.zeros(()))])
    with pytest.raises(TypeError, match="SparseAdam takes: lr, betas, eps, maximize"):
        shardopt.SparseAdam(make_embedding().parameters(), weight_decay=0.1)
    with pytest.raises(TypeError, match="SparseRowOptimizer shards SparseAdam, not Adam"):
        SparseRowOptimizer(make_embedding().parameters(), torch.optim.Adam)


def test_world_of_one_without_a_process_group_equals_torch() -> None:
    expected, expected_state = reference({"lr": 0.05}, "mean", [1] * STEPS)
    embedding = make_embedding()
    optimizer = shardopt.SparseAdam(embedding.parameters(), lr=0.05)
    assert isinstance(optimizer, SparseRowOptimizer)
    for step in range(STEPS):
        loss_of(embedding, 0, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        torch.testing.assert_close(embedding.weight.detach(), expected[step], **TOLERANCE)
    assert_sparse_adam_state_equal(optimizer.state_dict(), expected_state, "world of one")


# ---------------------------------------------------------------- SparseAdam and AdamW in one job


class Recommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embedding = nn.Embedding(ROWS, DIM, sparse=True)
        self.head = nn.Linear(DIM, 2)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(rows))


def recommender_loss(model: Recommender, rank: int, step: int) -> torch.Tensor:
    return torch.tanh(model(batch(rank, step))).pow(2).sum() * (rank + 1)


def two_optimizers_run() -> list[list[torch.Tensor]]:
    rank = dist.get_rank()
    model = Recommender()
    sparse = shardopt.SparseAdam(model.embedding.parameters(), lr=0.05)
    dense = shardopt.AdamW(model.head.parameters(), lr=0.01)
    trajectory = []
    for step in range(STEPS):
        recommender_loss(model, rank, step).backward()
        sparse.step()
        dense.step()
        sparse.zero_grad()
        dense.zero_grad()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory


def test_sparse_adam_for_the_embedding_and_adamw_for_the_rest() -> None:
    world_size = 2
    model = Recommender()
    sparse = torch.optim.SparseAdam(model.embedding.parameters(), lr=0.05)
    dense = torch.optim.AdamW(model.head.parameters(), lr=0.01)
    expected = []
    for step in range(STEPS):
        grads: list[list[torch.Tensor]] = []
        for rank in range(world_size):
            model.zero_grad(set_to_none=True)
            recommender_loss(model, rank, step).backward()
            grads.append([p.grad for p in model.parameters()])
        for position, param in enumerate(model.parameters()):
            param.grad = added([g[position] for g in grads]) / world_size
        model.embedding.weight.grad = model.embedding.weight.grad.coalesce()
        sparse.step()
        dense.step()
        expected.append([p.detach().clone() for p in model.parameters()])
    for rank, trajectory in enumerate(run_world(two_optimizers_run, world_size)):
        for step, (ours, theirs) in enumerate(zip(trajectory, expected, strict=True)):
            for a, b in zip(ours, theirs, strict=True):
                torch.testing.assert_close(a, b, **TOLERANCE, msg=f"rank {rank} step {step}")
