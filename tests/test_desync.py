"""Desync detection: ranks that build, extend or load the optimizer differently get the same clear
error on every rank, before any byte is exchanged wrongly, and the world goes on working."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import shardopt
from shardopt import checkpoint
from shardopt.fingerprint import DesyncError, check, stable_hash
from tests.common import flat_params, loss_of, make_model
from tests.world import run_world


def train(optimizer: shardopt.ShardedOptimizer, model: nn.Module, rank: int, steps: int) -> None:
    for step in range(steps):
        optimizer.zero_grad()
        loss_of(model, rank, step).backward()
        optimizer.step()


def desync_cases(directory: pathlib.Path) -> dict[str, str]:
    """Each case makes the last rank differ; returns each case's error message (or what went wrong)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    odd = rank == world - 1

    def wider() -> shardopt.ShardedOptimizer:
        model = make_model()
        if odd:
            model.hidden = nn.Linear(7, 6)
            model.out = nn.Linear(6, 3)
        return shardopt.Adam(model.parameters(), lr=1e-2)

    def fewer() -> shardopt.ShardedOptimizer:
        params = list(make_model().parameters())
        return shardopt.Adam(params[:-1] if odd else params, lr=1e-2)

    def dtype() -> shardopt.ShardedOptimizer:
        return shardopt.Adam(make_model().to(torch.float64 if odd else torch.float32).parameters(), lr=1e-2)

    def lr() -> shardopt.ShardedOptimizer:
        return shardopt.Adam(make_model().parameters(), lr=2e-2 if odd else 1e-2)

    def algorithm() -> shardopt.ShardedOptimizer:
        return (shardopt.AdamW if odd else shardopt.Adam)(make_model().parameters(), lr=1e-2)

    def stage() -> shardopt.ShardedOptimizer:
        return shardopt.Adam(make_model().parameters(), lr=1e-2, stage=1 if odd else 2)

    def added_group() -> shardopt.ShardedOptimizer:
        model = make_model()
        optimizer = shardopt.Adam([model.hidden.weight, model.hidden.bias], lr=1e-2)
        try:
            optimizer.add_param_group({"params": list(model.out.parameters()), "lr": 5e-3 if odd else 1e-3})
        finally:
            assert len(optimizer.param_groups) == 1, "a failed add_param_group left its group behind"
        return optimizer

    def loaded_state() -> shardopt.ShardedOptimizer:
        model = make_model()
        optimizer = shardopt.Adam(model.parameters(), lr=1e-2)
        train(optimizer, model, rank, 1)
        saved = optimizer.state_dict()
        if odd:  # as if the last rank had saved a step later
            saved["state"][0]["step"] += 1
        other = shardopt.Adam(make_model().parameters(), lr=1e-2)
        before = other.state_dict()
        try:
            other.load_state_dict(saved)
        finally:
            assert other.state_dict() == before, "a failed load_state_dict changed the optimizer"
        return other

    def scheduler_on_one_rank() -> shardopt.ShardedOptimizer:
        model = make_model()
        optimizer = shardopt.Adam(model.parameters(), lr=1e-2, verify_every=2)
        train(optimizer, model, rank, 1)
        if odd:
            optimizer.param_groups[0]["lr"] = 5e-3
        train(optimizer, model, rank, 1)
        return optimizer

    def loaded_checkpoint() -> shardopt.ShardedOptimizer:
        model = make_model()
        optimizer = shardopt.Adam(model.parameters(), lr=1e-2)
        for name in ("one", "two"):
            train(optimizer, model, rank, 1)
            checkpoint.save(directory / name, model=model, optimizer=optimizer)
        fresh = make_model()
        other = shardopt.Adam(fresh.parameters(), lr=1e-2)
        before = flat_params(fresh)
        try:
            checkpoint.load(directory / ("two" if odd else "one"), model=fresh, optimizer=other)
        finally:
            assert torch.equal(flat_params(fresh), before), "a failed load changed the model"
        return other

    def muon_lr() -> Any:
        matrices = [p for p in make_model().parameters() if p.ndim == 2]
        return shardopt.Muon(matrices, lr=2e-2 if odd else 1e-2)

    cases: dict[str, Callable[[], Any]] = {
        "muon lr": muon_lr,
        "wider": wider,
        "fewer": fewer,
        "dtype": dtype,
        "lr": lr,
        "algorithm": algorithm,
        "stage": stage,
        "added group": added_group,
        "loaded state": loaded_state,
        "scheduler on one rank": scheduler_on_one_rank,
        "loaded checkpoint": loaded_checkpoint,
    }
    found = {}
    for name, case in cases.items():
        try:
            case()
            found[name] = "no error"
        except DesyncError as error:
            found[name] = str(error)
    # Every case failed alike on every rank, so the world still runs collectives in step.
    model = make_model()
    train(shardopt.Adam(model.parameters(), lr=1e-2), model, rank, 2)
    found["after"] = "trained"
    return found


EXPECTED = {
    "muon lr": "the hyper-parameters of param group 0 (lr=",
    "wider": "parameter 1 of param group 0 (shape (",
    "fewer": "between 7 and 8 items",
    "dtype": "parameter 0 of param group 0 (shape (3,), torch.float",
    "lr": "the hyper-parameters of param group 0 (lr=",
    "algorithm": "the algorithm (Adam",
    "stage": "the options (stage,",
    "added group": "param group 1: the hyper-parameters of param group 1 (lr=",
    "loaded state": "the loaded scalar state (step counts) differs",
    "scheduler on one rank": "step() call 2 (verify_every): the hyper-parameters of param group 0 (lr=",
    "loaded checkpoint": "the checkpoint loaded",
}


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_that_differ_get_the_same_error_naming_the_difference(world_size: int, tmp_path: pathlib.Path) -> None:
    per_rank = run_world(desync_cases, world_size, tmp_path)
    for rank, found in enumerate(per_rank):
        assert found["after"] == "trained"
        for name, fragment in EXPECTED.items():
            assert fragment in found[name], f"rank {rank}, case {name!r}: {found[name]}"
            assert found[name].startswith("ranks disagree at "), found[name]
    # The same case gives the same error on every rank but for "this rank's value", which may differ.
    for name in EXPECTED:
        assert len({found[name].split(":")[0] for found in per_rank}) == 1, name


def test_hashes_are_stable_and_a_world_of_one_checks_nothing() -> None:
    assert stable_hash(("lr", 0.1)) == stable_hash(("lr", 0.1)) != stable_hash(("lr", 0.2))
    assert 0 <= stable_hash("anything") < 2**63

    class Alone:
        world_size = 1

    check(Alone(), [("anything", 1)], "a world of one")  # type: ignore[arg-type]


def test_verify_every_is_validated() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="verify_every must be None or a number of steps >= 1"):
            shardopt.Adam(make_model().parameters(), lr=1e-2, verify_every=bad)
