"""Sharded checkpoints of the algorithms not sharded by elements, and of several optimizers at once.

Adafactor (state by owner), LBFGS (slices of one flat vector), and the two-optimizer recipes
Muon + AdamW and SparseAdam (rows) + AdamW: saved at N ranks after SAVED_AT steps, loaded at
M ranks. At the same world size the resumed run is bit-identical to the uninterrupted one; at
another, the loaded state equals the saved one exactly and the run continues single-process
torch.optim's trajectory on the mean gradient.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import shutil
from typing import Any

import pytest
import torch
from torch import nn

import shardopt
from shardopt.checkpoint import CheckpointError
from shardopt.slices.optimizer import VECTOR_LISTS, VECTORS
from tests.common import assert_trajectories_close, flat_params, make_model
from tests.common import loss_of as tiny_loss
from tests.test_checkpoint import all_ranks, load_counting_reads, rank_and_world
from tests.test_lbfgs import assert_state_dicts_equal  # strict about types: LBFGS and SparseAdam keep numbers
from tests.test_sparse import Recommender, recommender_loss
from tests.world import run_world

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

CASES = ["Adafactor", "LBFGS", "Muon+AdamW", "SparseAdam+AdamW"]
SAVED_AT = 2  # steps before the save
RESUMED = 3  # steps after the load
EXACT = {"rtol": 0, "atol": 0}
# Muon's Newton-Schulz runs in bfloat16 (see test_owned.py); LBFGS's line of iterations in float32.
TOLERANCE = {"Muon+AdamW": {"rtol": 1e-3, "atol": 1e-4}, "LBFGS": {"rtol": 1e-4, "atol": 1e-5}}


def build(case: str, sharded: bool = True, fresh: bool = False) -> tuple[nn.Module, list[Any], list[Any]]:
    """The model, its optimizers (shardopt's, or torch.optim's own) and one scheduler each; ``fresh``
    moves every parameter, so that a load must replace them."""
    algorithms = shardopt if sharded else torch.optim
    model = Recommender() if case == "SparseAdam+AdamW" else make_model()
    if case == "Adafactor":
        optimizers = [algorithms.Adafactor(model.parameters(), lr=0.05)]
    elif case == "LBFGS":
        optimizers = [algorithms.LBFGS(model.parameters(), lr=0.5, history_size=3, max_iter=3)]
    elif case == "Muon+AdamW":
        matrices = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim != 2]
        optimizers = [algorithms.Muon(matrices, lr=0.02), algorithms.AdamW(rest, lr=0.01, weight_decay=0.1)]
    else:
        embedding, head = [model.embedding.weight], list(model.head.parameters())
        optimizers = [algorithms.SparseAdam(embedding, lr=0.05), algorithms.AdamW(head, lr=0.01)]
    if fresh:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.5)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in optimizers]
    return model, optimizers, schedulers


def one_or_all(objects: list[Any]) -> Any:
    """What save/load take: one object alone, several as a list."""
    return objects[0] if len(objects) == 1 else objects


def mean_loss(case: str, model: nn.Module, ranks: range, step: int) -> torch.Tensor:
    """The mean over ``ranks`` of their losses: its gradient is the mean gradient."""
    loss = recommender_loss if case == "SparseAdam+AdamW" else tiny_loss
    return sum(loss(model, rank, step) for rank in ranks) / len(ranks)


def train(case: str, model: nn.Module, optimizers: list[Any], schedulers: list[Any], steps: range, ranks: range):
    """Steps on the mean loss of ``ranks`` (this rank alone in a sharded run); parameters after each."""
    trajectory = []
    for step in steps:

        def closure(step: int = step) -> torch.Tensor:
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss = mean_loss(case, model, ranks, step)
            loss.backward()
            return loss

        if case == "LBFGS":
            optimizers[0].step(closure)
        else:
            closure()
            for optimizer in optimizers:
                optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        trajectory.append(flat_params(model))
    return trajectory


def reference(case: str, worlds: list[int]) -> list[torch.Tensor]:
    """torch.optim on one process; step s takes the mean loss of worlds[s] ranks."""
    model, optimizers, schedulers = build(case, sharded=False)
    trajectory = []
    for step, world in enumerate(worlds):
        trajectory += train(case, model, optimizers, schedulers, range(step, step + 1), range(world))
    return trajectory


def states(optimizers: list[Any], schedulers: list[Any]) -> Any:
    return copy.deepcopy(([o.state_dict() for o in optimizers], [s.state_dict() for s in schedulers]))


def held(optimizer: Any) -> int:
    """Elements of optimizer state (not 0-d) this rank holds."""
    if isinstance(optimizer, shardopt.ElementOptimizer):
        return sum(len(b.state) * sum(p.in_shard.size for p in b.pieces) for b in optimizer.buffers)
    if isinstance(optimizer, shardopt.ShardedLBFGS):
        entry = next(iter(optimizer.shard_state.values()), {})
        vectors = [entry[n] for n in VECTORS if entry.get(n) is not None]
        vectors += [v for n in VECTOR_LISTS for v in entry.get(n) or []]
        return len(vectors) * (optimizer.flat.stop - optimizer.flat.start)
    state = optimizer.owned_state if isinstance(optimizer, shardopt.OwnedOptimizer) else optimizer.shard_state
    return sum(t.numel() for entry in state.values() for t in entry.values() if isinstance(t, torch.Tensor) and t.ndim)


def elements(value: Any) -> int:
    """Elements of the tensors (not 0-d) in ``value``: a state dict's state, or part of it."""
    if isinstance(value, torch.Tensor):
        return value.numel() if value.ndim else 0
    if isinstance(value, (list, tuple)):
        return sum(elements(v) for v in value)
    if isinstance(value, dict):
        return sum(elements(v) for v in value.values())
    return 0


def resume(case: str, path: pathlib.Path) -> dict[str, Any]:
    """Load ``path`` into a fresh setup; what it read and holds, its state, and RESUMED steps after."""
    rank, _ = rank_and_world()
    model, optimizers, schedulers = build(case, fresh=True)
    extra, read = load_counting_reads(
        path, model=model, optimizer=one_or_all(optimizers), scheduler=one_or_all(schedulers)
    )
    return {
        "extra": extra,
        "read": all_ranks((read, sum(held(o) for o in optimizers))),
        "state": states(optimizers, schedulers),
        "trajectory": train(
            case, model, optimizers, schedulers, range(SAVED_AT, SAVED_AT + RESUMED), range(rank, rank + 1)
        ),
    }


def save_then_resume_world(directory: pathlib.Path, loads: list[int]) -> dict[tuple, Any]:
    """On every rank of this world: resume from the checkpoints of ``loads`` world sizes; then train
    SAVED_AT steps, save, go on uninterrupted for RESUMED steps, and resume from that save too."""
    rank, world = rank_and_world()
    results: dict[tuple, Any] = {}
    for case in CASES:
        for source in loads:
            results["resume", case, source] = resume(case, directory / f"{case}-n{source}")
        model, optimizers, schedulers = build(case)
        train(case, model, optimizers, schedulers, range(SAVED_AT), range(rank, rank + 1))
        path = directory / f"{case}-n{world}"
        shardopt.checkpoint.save(
            path, model=model, optimizer=one_or_all(optimizers), scheduler=one_or_all(schedulers), extra={"n": world}
        )
        results["saved", case] = states(optimizers, schedulers)
        uninterrupted = train(
            case, model, optimizers, schedulers, range(SAVED_AT, SAVED_AT + RESUMED), range(rank, rank + 1)
        )
        results["uninterrupted", case] = uninterrupted
        results["resume", case, world] = resume(case, path)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Any]:
    """Save at N = 2 and 3 (each also resumed at its own N); load 2 -> 3, then 3 -> 1 and 2 -> 1 here."""
    directory = tmp_path_factory.mktemp("whole")
    results = {2: run_world(save_then_resume_world, 2, directory, [])[0]}
    results[3] = run_world(save_then_resume_world, 3, directory, [2])[0]
    results[1] = {("resume", case, n): resume(case, directory / f"{case}-n{n}") for case in CASES for n in (2, 3)}
    return {"directory": directory, "results": results}


PAIRS = [(2, 3), (3, 1), (2, 1), (2, 2), (3, 3)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{n}to{m}" for n, m in PAIRS])
def test_load_restores_the_saved_state_exactly(runs: dict, case: str, source: int, target: int) -> None:
    resumed = runs["results"][target]["resume", case, source]
    (loaded, loaded_schedulers), (saved, saved_schedulers) = resumed["state"], runs["results"][source]["saved", case]
    for position, (ours, theirs) in enumerate(zip(loaded, saved, strict=True)):
        assert_state_dicts_equal(ours, theirs, f"{case} {source} -> {target}, optimizer {position}", **EXACT)
    assert str(loaded_schedulers) == str(saved_schedulers)
    assert resumed["extra"] == {"n": source}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", [2, 3])
def test_resume_at_the_same_world_size_is_bit_identical_to_the_uninterrupted_run(
    runs: dict, case: str, world: int
) -> None:
    results = runs["results"][world]
    for step, (ours, theirs) in enumerate(
        zip(results["resume", case, world]["trajectory"], results["uninterrupted", case])
    ):
        assert torch.equal(ours, theirs), (
            f"{case} at N={world}, step {SAVED_AT + step}: max |diff| {(ours - theirs).abs().max()}"
        )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("source", "target"), [(2, 3), (3, 1), (2, 1)], ids=["2to3", "3to1", "2to1"])
def test_resume_at_another_world_size_continues_torchs_trajectory(
    runs: dict, case: str, source: int, target: int
) -> None:
    trajectory = runs["results"][target]["resume", case, source]["trajectory"]
    expected = reference(case, [source] * SAVED_AT + [target] * RESUMED)[SAVED_AT:]
    assert_trajectories_close(trajectory, expected, f"{case} N={source} -> M={target}", **TOLERANCE.get(case, {}))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{n}to{m}" for n, m in PAIRS])
def test_each_rank_reads_only_the_state_it_holds(runs: dict, case: str, source: int, target: int) -> None:
    per_rank = runs["results"][target]["resume", case, source]["read"]
    for rank, (read, holds) in enumerate(per_rank):
        assert read == holds, (
            f"{case}: rank {rank} of {target} read {read} elements of optimizer state but holds {holds}"
        )
    saved, _ = runs["results"][source]["saved", case]
    assert sum(holds for _, holds in per_rank) == elements([state["state"] for state in saved])


@pytest.mark.parametrize("case", CASES)
def test_consolidate_gives_torch_optims_format_which_torch_optim_loads(runs: dict, case: str) -> None:
    consolidated = shardopt.checkpoint.consolidate(runs["directory"] / f"{case}-n3")
    saved, saved_schedulers = runs["results"][3]["saved", case]
    exported = consolidated["optimizer"] if len(saved) > 1 else [consolidated["optimizer"]]
    model, optimizers, _ = build(case, sharded=False)
    for position, (state, theirs, optimizer) in enumerate(zip(exported, saved, optimizers, strict=True)):
        assert_state_dicts_equal(state, theirs, f"{case} export, optimizer {position}", **EXACT)
        optimizer.load_state_dict(state)
        assert_state_dicts_equal(optimizer.state_dict(), theirs, f"{case} torch.optim, optimizer {position}", **EXACT)
    schedulers = consolidated["scheduler"] if len(saved) > 1 else [consolidated["scheduler"]]
    assert str(schedulers) == str(saved_schedulers)
    model.load_state_dict(consolidated["model"])


def load_torch_world(directory: pathlib.Path) -> dict[str, Any]:
    """Every case's N=2 export (optimizers and schedulers as lists where several) back into shardopt."""
    loaded = {}
    for case in CASES:
        model, optimizers, schedulers = build(case, fresh=True)
        shardopt.checkpoint.load_torch(
            directory / f"{case}-n2.pt", model=model, optimizer=one_or_all(optimizers), scheduler=one_or_all(schedulers)
        )
        loaded[case] = states(optimizers, schedulers)
    return loaded


def test_export_then_load_torch_at_another_world_size_restores_the_state(runs: dict) -> None:
    directory = runs["directory"]
    for case in CASES:
        shardopt.checkpoint.export(directory / f"{case}-n2", directory / f"{case}-n2.pt")
    loaded = run_world(load_torch_world, 3, directory)[0]
    for case in CASES:
        (ours, ours_schedulers), (theirs, theirs_schedulers) = loaded[case], runs["results"][2]["saved", case]
        for position, (mine, saved) in enumerate(zip(ours, theirs, strict=True)):
            assert_state_dicts_equal(mine, saved, f"{case} load_torch, optimizer {position}", **EXACT)
        assert str(ours_schedulers) == str(theirs_schedulers)


def test_a_version_1_manifest_still_loads(runs: dict, tmp_path: pathlib.Path) -> None:
    """Checkpoints written before several optimizers were possible held one record at the top level."""
    shutil.copytree(runs["directory"] / "Adafactor-n2", tmp_path / "old")
    manifest_path = tmp_path / "old" / "shardopt.json"
    manifest = json.loads(manifest_path.read_text())
    (record,) = manifest.pop("optimizers")
    manifest_path.write_text(json.dumps({**manifest, **record, "version": 1}))
    model, optimizers, schedulers = build("Adafactor", fresh=True)
    shardopt.checkpoint.load(tmp_path / "old", model=model, optimizer=optimizers[0], scheduler=schedulers[0])
    (state,), _ = states(optimizers, schedulers)
    ((saved,), _) = runs["results"][2]["saved", "Adafactor"]
    assert_state_dicts_equal(state, saved, "version 1", **EXACT)


# ---------------------------------------------------------------------- mismatches

MISMATCHES = {
    # case saved, case loaded, what the error says
    "fewer optimizers": ("Muon+AdamW", "Adafactor", r"holds the state of 2 optimizer\(s\) \(Muon, AdamW\) but 1 were"),
    "more optimizers": ("Adafactor", "Muon+AdamW", r"holds the state of 1 optimizer\(s\) \(Adafactor\) but 2 were"),
    "other algorithm": ("Adafactor", "LBFGS", r"holds Adafactor state but the optimizer runs LBFGS"),
    "other algorithm at a position": (
        "Muon+AdamW",
        "Muon+SGD",
        r"holds AdamW state at position 1 of optimizer= but the optimizer runs SGD",
    ),
    "other model": ("SparseAdam+AdamW", "LBFGS", r"belongs to a different model"),
    "schedulers not one per optimizer": ("Muon+AdamW", "Muon+AdamW, one scheduler", r"scheduler= is one scheduler"),
}


def build_loading(case: str) -> tuple[nn.Module, Any, Any]:
    """What the mismatch cases load into: a CASES setup, or a variant of one."""
    if case == "Muon+SGD":
        model, (muon, _), _ = build("Muon+AdamW")
        sgd = shardopt.SGD([p for p in model.parameters() if p.ndim != 2], lr=0.1, momentum=0.9)
        return model, [muon, sgd], None
    model, optimizers, schedulers = build(case.removesuffix(", one scheduler"))
    return model, one_or_all(optimizers), schedulers[0] if case.endswith("one scheduler") else one_or_all(schedulers)


def mismatches_world(directory: pathlib.Path) -> dict[str, tuple[str | None, bool]]:
    """Every mismatched load on every rank: the error, and whether everything stayed as it was."""
    rank, _ = rank_and_world()
    outcomes = {}
    for what, (saved, loading, _) in MISMATCHES.items():
        model, optimizer, scheduler = build_loading(loading)
        optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
        train(loading, model, optimizers, [], range(1), range(rank, rank + 1))
        before = (copy.deepcopy([o.state_dict() for o in optimizers]), flat_params(model))
        try:
            shardopt.checkpoint.load(directory / f"{saved}-n2", model=model, optimizer=optimizer, scheduler=scheduler)
            message = None
        except CheckpointError as error:
            message = str(error)
        after = ([o.state_dict() for o in optimizers], flat_params(model))
        outcomes[what] = (message, torch.equal(before[1], after[1]) and str(before[0]) == str(after[0]))
    return outcomes


@pytest.fixture(scope="module")
def mismatches(runs: dict) -> list[dict[str, tuple[str | None, bool]]]:
    return run_world(mismatches_world, 2, runs["directory"])


@pytest.mark.parametrize("what", list(MISMATCHES))
def test_a_mismatched_load_raises_on_every_rank_naming_it_and_changes_nothing(mismatches: list, what: str) -> None:
    messages = [outcomes[what][0] for outcomes in mismatches]
    assert all(m is not None and re.search(MISMATCHES[what][2], m) for m in messages), f"per rank: {messages}"
    changed = [rank for rank, outcomes in enumerate(mismatches) if not outcomes[what][1]]
    assert not changed, f"the failed load changed the model or optimizers on ranks {changed}"


def test_save_refuses_an_optimizer_it_cannot_describe(tmp_path: pathlib.Path) -> None:
    model = make_model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match=r"optimizer=\[\.\.\.\]\[1\] is a torch\.optim\.sgd\.SGD"):
        shardopt.checkpoint.save(tmp_path / "c", model=model, optimizer=[shardopt.Adafactor(model.parameters()), plain])
    assert list(tmp_path.iterdir()) == []


def test_load_torch_of_several_optimizers_changes_none_when_one_refuses_its_state() -> None:
    model, optimizers, schedulers = build("Muon+AdamW")
    train("Muon+AdamW", model, optimizers, schedulers, range(1), range(0, 1))
    earlier = copy.deepcopy([o.state_dict() for o in optimizers])
    train("Muon+AdamW", model, optimizers, schedulers, range(1, 2), range(0, 1))
    before = copy.deepcopy([o.state_dict() for o in optimizers])
    wrong = copy.deepcopy(earlier[1])
    wrong["param_groups"][0]["params"].append(99)  # one parameter too many for AdamW's group
    with pytest.raises(CheckpointError, match=r"\(optimizer 1\): loaded state dict's parameter group 0 has 4"):
        shardopt.checkpoint.load_torch({"optimizer": [earlier[0], wrong]}, optimizer=optimizers)
    for position, (optimizer, state) in enumerate(zip(optimizers, before)):
        assert_state_dicts_equal(optimizer.state_dict(), state, f"optimizer {position}", **EXACT)
