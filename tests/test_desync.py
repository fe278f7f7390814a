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
from shardopt.collectives.fingerprint import DesyncError, check, stable_hash
from shardopt.collectives.phases import ranks_text
from tests.common import assert_identical, flat_params, loss_of, make_model
from tests.test_clipping import split
from tests.test_sparse import loss_of as sparse_loss_of
from tests.test_sparse import make_embedding
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
        other_model = make_model(seed=1)
        other = shardopt.Adam(other_model.parameters(), lr=1e-2)
        train(other, other_model, rank, 2)  # state of its own, that a partial load would change
        before = other.state_dict(), flat_params(other_model)
        try:
            other.load_state_dict(saved)
        finally:
            assert_identical((other.state_dict(), flat_params(other_model)), before)
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
        fresh = make_model(seed=1)
        other = shardopt.Adam(fresh.parameters(), lr=1e-2)
        train(other, fresh, rank, 1)
        before = other.state_dict(), flat_params(fresh)
        try:
            checkpoint.load(directory / ("two" if odd else "one"), model=fresh, optimizer=other)
        finally:
            assert_identical((other.state_dict(), flat_params(fresh)), before)
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


STEP_DESYNC_TIMEOUT = 3  # seconds: the rank one step() ahead waits this long in that step for the others


def one_step_more(directory: pathlib.Path, call: str, stage: int) -> tuple[str, str]:
    """Rank 1 calls step() once more than the others, then every rank makes ``call``: what each raised."""
    import torch.distributed as dist

    rank = dist.get_rank()
    model = make_model()
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2, timeout=STEP_DESYNC_TIMEOUT, stage=stage)
    try:
        train(optimizer, model, rank, 2 if rank == 1 else 1)
        if call == "state_dict()":
            optimizer.state_dict()
        else:
            checkpoint.save(directory / "checkpoint", model=model, optimizer=optimizer)
    except Exception as error:
        return type(error).__name__, str(error)
    return "no error", ""


def assert_rank_1_one_step_ahead(
    per_rank: list[tuple[str, str]], call: str, timeout: float, label: str, ahead: str = "step() call 2"
) -> None:
    """Every rank raised DesyncError naming rank 1 in its extra step() (or, at stage 1, in the backward
    before it, whose reduction is its first collective: ``ahead``) and the others in ``call``."""
    others = [rank for rank in range(len(per_rank)) if rank != 1]
    counts = f"{ranks_text(others)} {'is' if len(others) == 1 else 'are'} in {call} after 1 step() call"
    for rank, (kind, message) in enumerate(per_rank):
        assert kind == "DesyncError", f"{label}, rank {rank}: {kind}: {message}"
        assert f"rank 1 is in {ahead}" in message and counts in message, f"{label}, rank {rank}: {message}"
    # The others find rank 1 on the phase board before any collective; rank 1 waits in its step.
    for rank in others:
        assert per_rank[rank][1].startswith(f"ranks disagree at {call} after 1 step() call: "), (label, per_rank[rank])
    assert f"did not complete (the timeout is {timeout:g} s)" in per_rank[1][1], (label, per_rank[1])


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize(("call", "world_size"), [("state_dict()", 3), ("checkpoint.save", 2)])
def test_a_rank_with_one_step_more_is_a_desync_error_naming_the_step_counts(
    call: str, world_size: int, stage: int, tmp_path: pathlib.Path
) -> None:
    # A world of its own: rank 1 leaves its extra step's collectives pending.
    per_rank = run_world(one_step_more, world_size, tmp_path, call, stage, fresh=True)
    ahead = "step() call 2" if stage == 2 else "backward after 1 step() call"
    assert_rank_1_one_step_ahead(per_rank, call, STEP_DESYNC_TIMEOUT, f"Adam stage {stage}", ahead)


# ---------------------------------------------------------------------- whole-parameter optimizers and clipping

# Seconds: how long each mismatched call below waits in its collective before it raises (rank 1's
# extra step waits it out in every case, so the whole world's time grows with it).
MISMATCH_TIMEOUT = 2
WHOLE_PARAMETER = ("Adafactor", "SparseAdam", "LBFGS")


def driven(algorithm: str, group: Any) -> tuple[Any, Callable[[int], None]]:
    """A new optimizer of ``algorithm`` on ``group``, and one training step of it on this rank's data."""
    import torch.distributed as dist

    rank = dist.get_rank()
    model: nn.Module = make_embedding() if algorithm == "SparseAdam" else make_model()
    loss = sparse_loss_of if algorithm == "SparseAdam" else loss_of
    keywords = {"max_iter": 2} if algorithm == "LBFGS" else {"lr": 1e-2}
    optimizer = getattr(shardopt, algorithm)(
        model.parameters(), process_group=group, timeout=MISMATCH_TIMEOUT, **keywords
    )

    def train_step(step: int) -> None:
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = loss(model, rank, step)
            value.backward()
            return value

        if algorithm == "LBFGS":
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()

    return optimizer, train_step


def whole_parameter_step_desyncs() -> dict[tuple[str, str], tuple[str, str]]:
    """Rank 1 calls step() once more than rank 0, then both call state_dict(), or load_state_dict() of
    the dict they took together: what each raised, per (algorithm, call). Each case runs on a process
    group of its own, as rank 1's extra step leaves its collective pending on the case's group."""
    import torch.distributed as dist

    rank, found = dist.get_rank(), {}
    for algorithm in WHOLE_PARAMETER:
        for call in ("state_dict()", "load_state_dict()"):
            optimizer, train_step = driven(algorithm, dist.new_group())
            try:
                train_step(0)
                saved = optimizer.state_dict() if call == "load_state_dict()" else None
                if rank == 1:
                    train_step(1)
                if saved is None:
                    optimizer.state_dict()
                else:
                    optimizer.load_state_dict(saved)
                found[(algorithm, call)] = ("no error", "")
            except Exception as error:
                found[(algorithm, call)] = (type(error).__name__, str(error))
    return found


def test_whole_parameter_optimizers_name_a_rank_with_one_step_more_at_state_dict_and_load() -> None:
    per_rank = run_world(whole_parameter_step_desyncs, 2, fresh=True)  # it leaves collectives pending
    for algorithm in WHOLE_PARAMETER:
        for call in ("state_dict()", "load_state_dict()"):
            outcomes = [found[(algorithm, call)] for found in per_rank]
            # Adafactor reduces at the end of backward, as DDP does: rank 1's extra step waits there.
            ahead = "backward after 1 step() call" if algorithm == "Adafactor" else "step() call 2"
            assert_rank_1_one_step_ahead(outcomes, call, MISMATCH_TIMEOUT, f"{algorithm} {call}", ahead)


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


# What rank 0 calls between backward and step() that rank 1 skips, per case: the call the errors must name.
SKIPPED = {
    "Adam, clip_grad_norm_": "clip_grad_norm_()",
    "Adafactor, clip_grad_norm_": "clip_grad_norm_()",
    "Adafactor and Adam, shardopt.clip_grad_norm_": "clip_grad_norm_()",
    "Adafactor, GradScaler.unscale_": "GradScaler.unscale_()",
}


def skipped_calls() -> dict[str, tuple[str, str]]:
    """Rank 0 clips (or unscales) before step(), rank 1 goes straight to step(): what each raised, per
    case, each on a process group of its own (the mismatched collectives stay pending on it)."""
    import torch.distributed as dist

    rank, found = dist.get_rank(), {}
    for case in SKIPPED:
        group, model = dist.new_group(), make_model()
        options = {"lr": 1e-2, "process_group": group, "timeout": MISMATCH_TIMEOUT}
        if case.startswith("Adafactor and Adam"):
            matrices = [model.hidden.weight, model.out.weight]
            rest = [model.hidden.bias, model.out.bias, model.scale]
            optimizers = [shardopt.Adafactor(matrices, **options), shardopt.Adam(rest, **options)]
        else:
            optimizers = [getattr(shardopt, case.split(",")[0])(model.parameters(), **options)]
        scaler = shardopt.GradScaler("cpu")
        try:
            scaler.scale(loss_of(model, rank, 0)).backward()
            if rank == 0 and case.endswith("GradScaler.unscale_"):
                scaler.unscale_(optimizers[0])
            elif rank == 0 and len(optimizers) > 1:
                shardopt.clip_grad_norm_(optimizers, 1.0)
            elif rank == 0:
                optimizers[0].clip_grad_norm_(1.0)
            for optimizer in optimizers:
                optimizer.step()
            found[case] = ("no error", "")
        except Exception as error:
            found[case] = (type(error).__name__, str(error))
    return found


def test_a_rank_that_skips_the_clip_or_the_unscale_is_named_with_the_call_on_every_rank() -> None:
    per_rank = run_world(skipped_calls, 2, fresh=True)  # it leaves collectives pending
    for case, call in SKIPPED.items():
        for rank, found in enumerate(per_rank):
            kind, message = found[case]
            where = f"{case}, rank {rank}: {kind}: {message}"
            # Each rank's collective times out; the board tells where the other is.
            assert kind == "DesyncError", where
            assert f"did not complete (the timeout is {MISMATCH_TIMEOUT} s)" in message, where
            assert f"({call if rank == 0 else 'step() call 1'}) on rank {rank} of 2" in message, where
            assert f"rank 0 is in {call} while rank 1 is in step() call 1" in message, where


# ---------------------------------------------------------------------- calls left behind


def calls_left(directory: pathlib.Path) -> list[tuple[str, list[tuple[str, bool]]]]:
    """Each collective call, made to return or to raise, and then, for each optimizer it was made
    on, the last call that optimizer entered and whether it still counts itself inside it (a
    later collective's error would say "(state_dict())" where "(after state_dict())" is true)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    model = make_model()
    matrices, rest = split(model)
    both = [shardopt.Muon(matrices, lr=0.02), shardopt.AdamW(rest, lr=1e-2)]
    sharded = both[1]
    good = sharded.state_dict()
    calls: list[tuple[str, list[Any], Callable[[], Any]]] = [
        ("step()", both, lambda: [o.step() for o in both]),
        ("state_dict()", [sharded], sharded.state_dict),
        ("load_state_dict()", [sharded], lambda: sharded.load_state_dict(good)),
        ("load_state_dict()", [sharded], lambda: sharded.load_state_dict({**good, "param_groups": []})),
        ("checkpoint.save", both, lambda: checkpoint.save(directory / "c", model=model, optimizer=both)),
        ("checkpoint.load", both, lambda: checkpoint.load(directory / "c", model=model, optimizer=both)),
        # Refused: the checkpoint holds two optimizers.
        ("checkpoint.load", [sharded], lambda: checkpoint.load(directory / "c", model=model, optimizer=sharded)),
    ]
    seen = []
    for call, optimizers, make in calls:
        for o in both:
            o.zero_grad()
        loss_of(model, rank, 0).backward()
        try:
            make()
        except (ValueError, checkpoint.CheckpointError):
            pass
        seen.append((call, [(str(o._comm.phase), o._comm.inside) for o in optimizers]))
    return seen


def test_every_collective_call_is_left_when_it_returns_or_raises(tmp_path: pathlib.Path) -> None:
    for rank, seen in enumerate(run_world(calls_left, 2, tmp_path)):
        for position, (call, phases) in enumerate(seen):
            label = (rank, position, call, phases)
            assert all(phase.startswith(call) and not inside for phase, inside in phases), label


def plateau_per_rank() -> dict[str, tuple[str, str, bool]]:
    """ReduceLROnPlateau stepped with each rank's own metric: by the second step rank 1's lr is cut
    and the others' not. Per algorithm: what each rank raised, and whether the parameters stayed alike."""
    import torch.distributed as dist

    rank, found = dist.get_rank(), {}
    for algorithm in ("AdamW", "Adafactor"):
        model = make_model()
        optimizer = shardopt.ShardedOptimizer(model.parameters(), algorithm, lr=0.05)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
        outcome = ("no error", "")
        try:
            for step in range(3):
                optimizer.zero_grad()
                loss_of(model, rank, step).backward()
                optimizer.step()
                plateau.step(1.0 if rank == 1 else 1.0 - step)  # rank 1 sees no improvement
        except DesyncError as error:
            outcome = (type(error).__name__, str(error))
        gathered = [torch.zeros_like(flat_params(model)) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat_params(model))
        found[algorithm] = (*outcome, all(torch.equal(g, gathered[0]) for g in gathered))
    return found


def test_hyper_parameters_that_differ_between_ranks_are_a_desync_error_before_the_update() -> None:
    # Three ranks: two agree, one does not (a sum of hashes alone could not tell every rank alike).
    for rank, found in enumerate(run_world(plateau_per_rank, 3)):
        for algorithm, (kind, message, alike) in found.items():
            assert kind == "DesyncError", (algorithm, rank, message)
            assert "hyper-parameters of param group 0" in message and "ReduceLROnPlateau" in message, (algorithm, rank)
            assert alike, f"{algorithm} rank {rank}: parameters updated with different lrs"
