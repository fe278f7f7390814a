"""Checkpoints: sharded save and load at any world size, crash safety, torch.optim export and import.

A run saved after SAVED_AT steps at N ranks and resumed at M ranks must continue the
trajectory of one uninterrupted torch.optim run fed, at every step, the mean gradient of
the ranks of that step.
"""

from __future__ import annotations

import copy
import math
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from typing import Any

import pytest
import torch
from torch import nn

import shardopt
from shardopt.checkpoint import CheckpointError
from shardopt.checkpoint.chunks import LoadPlanner
from tests.common import (
    TinyNet,
    assert_identical,
    assert_state_dicts_equal,
    assert_trajectories_close,
    flat_params,
    loss_of,
    make_model,
    set_mean_grads,
)
from tests.world import run_world

# DCP says so on every save and load in a world of one, which the in-process legs are.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

REPO = pathlib.Path(__file__).resolve().parents[1]
PAIRS = [(1, 4), (2, 1), (2, 3), (3, 2), (4, 2)]
NAMES = ["AdamW", "SGD"]
SAVED_AT = 3  # steps before the save
RESUMED = 5  # steps after the load
TORCH_STEPS = 2  # steps plain torch.optim takes between export and import


def param_groups(model: nn.Module, name: str) -> list[dict[str, Any]]:
    if name == "AdamW":
        return [{"params": list(model.parameters())}]
    # Two groups, so that parameters are numbered across groups.
    return [{"params": list(model.hidden.parameters()), "lr": 0.05}, {"params": [*model.out.parameters(), model.scale]}]


def keywords(name: str) -> dict[str, Any]:
    if name == "AdamW":  # a tensor lr must survive the JSON manifest
        return {"lr": torch.tensor(1e-2), "weight_decay": 0.1}
    return {"lr": 0.1, "momentum": 0.9}


def build(name: str, seed: int = 0) -> tuple[nn.Module, shardopt.ShardedOptimizer, Any]:
    model = make_model(seed)
    optimizer = shardopt.ShardedOptimizer(param_groups(model, name), getattr(torch.optim, name), **keywords(name))
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def build_torch(name: str) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = make_model()
    optimizer = getattr(torch.optim, name)(param_groups(model, name), **keywords(name))
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def train(model: nn.Module, optimizer: Any, scheduler: Any, steps: range) -> list[torch.Tensor]:
    rank, _ = rank_and_world()
    trajectory = []
    for step in steps:
        optimizer.zero_grad()
        loss_of(model, rank, step).backward()
        optimizer.step()
        scheduler.step()
        trajectory.append(flat_params(model))
    return trajectory


def reference(name: str, worlds: list[int]) -> list[torch.Tensor]:
    """torch.optim on one process; step s is fed the mean gradient of worlds[s] ranks."""
    model, optimizer, scheduler = build_torch(name)
    trajectory = []
    for step, world in enumerate(worlds):
        set_mean_grads(model, world, step)
        optimizer.step()
        scheduler.step()
        trajectory.append(flat_params(model))
    return trajectory


def extra_of(world: int) -> dict[str, Any]:
    return {"step": SAVED_AT, "world": world, "tag": torch.arange(4.0), "pair": (1, "a"), 7: None}


def load_counting_reads(path: pathlib.Path, **objects: Any) -> tuple[dict[str, Any], int]:
    """What ``load`` returns, and how many elements of optimizer state (not 0-d) it reads on this
    rank (from DCP's local load plan)."""
    original = LoadPlanner.create_local_plan
    read = []

    def create_local_plan(self: LoadPlanner) -> Any:
        plan = original(self)
        items = [i for i in plan.items if i.dest_index.fqn.startswith("optim.") and len(i.lengths) >= 1]
        read.extend(math.prod(item.lengths) for item in items)
        return plan

    LoadPlanner.create_local_plan = create_local_plan
    try:
        return shardopt.checkpoint.load(path, **objects), sum(read)
    finally:
        LoadPlanner.create_local_plan = original


def all_ranks(value: Any) -> list[Any]:
    """Every rank's ``value``, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def checkpoint_legs(directory: pathlib.Path, saves: bool, loads: list[int], imports: bool) -> dict[tuple, Any]:
    """On every rank: resume from the checkpoints of ``loads`` world sizes (and from plain
    torch.optim's files when ``imports``), then (if ``saves``) train SAVED_AT steps and save."""
    _, world = rank_and_world()
    results: dict[tuple, Any] = {}
    for name in NAMES:
        for source in loads:
            model, optimizer, scheduler = build(name, seed=1)  # other parameters: the load must replace them
            extra, read = load_counting_reads(
                directory / f"{name}-n{source}", model=model, optimizer=optimizer, scheduler=scheduler
            )
            owned = sum(len(b.state) * sum(p.in_shard.size for p in b.pieces) for b in optimizer.buffers)
            results["read", name, source] = all_ranks((read, owned))
            # A copy: the scheduler changes a tensor lr in place as training goes on.
            loaded = copy.deepcopy((optimizer.state_dict(), scheduler.state_dict(), extra))
            loaded += (optimizer.param_groups[0]["lr"],)
            trajectory = train(model, optimizer, scheduler, range(SAVED_AT, SAVED_AT + RESUMED))
            results["load", name, source] = (loaded, trajectory)
        if imports:
            model, optimizer, scheduler = build(name, seed=1)
            shardopt.checkpoint.load_torch(
                directory / f"{name}-torch.pt", model=model, optimizer=optimizer, scheduler=scheduler
            )
            start = SAVED_AT + TORCH_STEPS
            results["import", name] = train(model, optimizer, scheduler, range(start, start + RESUMED))
        if saves:
            model, optimizer, scheduler = build(name)
            train(model, optimizer, scheduler, range(SAVED_AT))
            shardopt.checkpoint.save(
                directory / f"{name}-n{world}",
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                extra=extra_of(world),
            )
            results["save", name] = (optimizer.state_dict(), scheduler.state_dict())
    return results


def torch_middle(directory: pathlib.Path, name: str) -> None:
    """Plain torch.optim resumes from the exported N=2 checkpoint for TORCH_STEPS steps (3 ranks'
    mean gradient), then saves its own state for the import at N=3."""
    exported = torch.load(directory / f"{name}-n2.pt", weights_only=True)
    model, optimizer, scheduler = build_torch(name)
    model.load_state_dict(exported["model"])
    optimizer.load_state_dict(exported["optimizer"])
    scheduler.load_state_dict(exported["scheduler"])
    for step in range(SAVED_AT, SAVED_AT + TORCH_STEPS):
        set_mean_grads(model, 3, step)
        optimizer.step()
        scheduler.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(state, directory / f"{name}-torch.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Any]:
    """Save at N = 1, 2, 3, 4 and load at the M of every pair, ordered so that each load finds
    its checkpoint; N=2 is also exported, continued by torch.optim and imported at N=3."""
    directory = tmp_path_factory.mktemp("checkpoints")
    results = {1: checkpoint_legs(directory, True, [], False)}  # a world of one, in this process
    results[2] = run_world(checkpoint_legs, 2, directory, True, [], False)[0]
    for name in NAMES:
        command = [sys.executable, "-m", "shardopt.checkpoint", "export", directory / f"{name}-n2", f"{name}-n2.pt"]
        subprocess.run([str(c) for c in command], cwd=directory, check=True, env=_env())
        torch_middle(directory, name)
    results[3] = run_world(checkpoint_legs, 3, directory, True, [2], True)[0]
    results[4] = run_world(checkpoint_legs, 4, directory, True, [1], False)[0]
    results["2 again"] = run_world(checkpoint_legs, 2, directory, False, [3, 4], False)[0]
    results["1 again"] = checkpoint_legs(directory, False, [2], False)
    return {"directory": directory, "results": results}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _loading_world(runs: dict, target: int) -> dict:
    results = runs["results"]
    return {4: results[4], 1: results["1 again"], 3: results[3], 2: results["2 again"]}[target]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{n}to{m}" for n, m in PAIRS])
def test_resumed_run_continues_the_trajectory(runs: dict, name: str, source: int, target: int) -> None:
    _, trajectory = _loading_world(runs, target)["load", name, source]
    expected = reference(name, [source] * SAVED_AT + [target] * RESUMED)[SAVED_AT:]
    assert_trajectories_close(trajectory, expected, f"{name} N={source} -> M={target}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{n}to{m}" for n, m in PAIRS])
def test_load_restores_state_scheduler_and_extra_exactly(runs: dict, name: str, source: int, target: int) -> None:
    (state, scheduler_state, extra, lr), _ = _loading_world(runs, target)["load", name, source]
    saved_state, saved_scheduler = runs["results"][source]["save", name]
    label = f"{name} N={source} -> M={target}"
    assert_state_dicts_equal(state, saved_state, label, rtol=0, atol=0)  # step counts included
    assert str(scheduler_state) == str(saved_scheduler)
    assert extra.keys() == extra_of(source).keys()
    assert torch.equal(extra.pop("tag"), torch.arange(4.0))
    assert extra == {k: v for k, v in extra_of(source).items() if k != "tag"}
    assert isinstance(lr, torch.Tensor) == (name == "AdamW")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{n}to{m}" for n, m in PAIRS])
def test_each_rank_reads_only_the_state_it_will_own(runs: dict, name: str, source: int, target: int) -> None:
    for rank, (read, owned) in enumerate(_loading_world(runs, target)["read", name, source]):
        assert read == owned, f"rank {rank} of {target} read {read} elements of optimizer state but owns {owned}"


@pytest.mark.parametrize("name", NAMES)
def test_export_torch_optim_import_continues_the_trajectory(runs: dict, name: str) -> None:
    trajectory = runs["results"][3]["import", name]
    worlds = [2] * SAVED_AT + [3] * (TORCH_STEPS + RESUMED)
    assert_trajectories_close(trajectory, reference(name, worlds)[SAVED_AT + TORCH_STEPS :], f"{name} import")


def test_export_is_torch_optims_format(runs: dict) -> None:
    """What export wrote is exactly what the N=2 run's state_dict() gave, and it loads with weights_only."""
    exported = torch.load(runs["directory"] / "AdamW-n2.pt", weights_only=True)
    saved_state, saved_scheduler = runs["results"][2]["save", "AdamW"]
    assert_state_dicts_equal(exported["optimizer"], saved_state, "export", rtol=0, atol=0)
    assert str(exported["scheduler"]) == str(saved_scheduler)
    optimizer = torch.optim.AdamW(make_model().parameters(), **keywords("AdamW"))
    optimizer.load_state_dict(exported["optimizer"])
    assert_state_dicts_equal(optimizer.state_dict(), saved_state, "torch.optim", rtol=0, atol=0)


def test_dcp_tools_read_the_checkpoint(runs: dict, tmp_path: pathlib.Path) -> None:
    """DCP's own converter reads it; each parameter's state is one tensor, whatever the ranks."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(runs["directory"] / "AdamW-n3", tmp_path / "dcp.pt")
    flat = torch.load(tmp_path / "dcp.pt", weights_only=True)
    saved_state, _ = runs["results"][3]["save", "AdamW"]
    # torch.optim numbers TinyNet's own parameter (scale) first, then its submodules'.
    torch.testing.assert_close(flat["optim.state.hidden.weight.exp_avg"].view(5, 7), saved_state["state"][1]["exp_avg"])
    torch.testing.assert_close(flat["optim.state.scale.step"], saved_state["state"][0]["step"])
    assert not any(key.startswith("optim.param_groups") for key in flat)  # hyper-parameters live in our JSON


# ---------------------------------------------------------------------- async save


def async_save_world(directory: pathlib.Path) -> dict[str, Any]:
    model, optimizer, scheduler = build("AdamW")
    train(model, optimizer, scheduler, range(SAVED_AT))
    at_save = copy.deepcopy((optimizer.state_dict(), flat_params(model)))  # the scheduler changes lr in place
    future = shardopt.checkpoint.save(
        directory / "async", model=model, optimizer=optimizer, scheduler=scheduler, async_save=True
    )
    train(model, optimizer, scheduler, range(SAVED_AT, SAVED_AT + 3))  # changes what is being written
    future.result()
    model, optimizer, scheduler = build("AdamW", seed=1)
    shardopt.checkpoint.load(directory / "async", model=model, optimizer=optimizer, scheduler=scheduler)
    return {
        "future": isinstance(future, Future),
        "at_save": at_save,
        "loaded": (optimizer.state_dict(), flat_params(model)),
    }


def test_async_save_writes_the_state_of_the_call_while_training_goes_on(tmp_path: pathlib.Path) -> None:
    # fresh: the async writer leaves its process group and thread behind in the ranks' processes.
    result = run_world(async_save_world, 2, tmp_path, fresh=True)[0]
    assert result["future"]
    assert_state_dicts_equal(result["loaded"][0], result["at_save"][0], "async", rtol=0, atol=0)
    assert torch.equal(result["loaded"][1], result["at_save"][1])
    assert not list(tmp_path.glob("*.partial-*"))


# ---------------------------------------------------------------------- bad checkpoints


class WiderNet(TinyNet):
    """TinyNet with a hidden layer of 6."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(7, 6), nn.Linear(6, 3)


class RenamedNet(nn.Module):
    """TinyNet's shapes under other names."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.scale = nn.Linear(7, 5), nn.Linear(5, 3), nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x))) * self.scale


BAD = {
    "incomplete": ("incomplete", r"incomplete checkpoint: it has no COMPLETE marker"),
    "truncated": ("truncated", r"__1_0\.distcp is truncated"),
    "corrupt": ("corrupt", r"__0_0\.distcp is corrupt"),
    "wider model": ("good", r"belongs to a different model: model\.hidden\.weight is float32 of shape \(5, 7\)"),
    "renamed model": ("good", r"belongs to a different model"),
    "missing": ("missing", r"is not a checkpoint directory"),
    "other algorithm": ("good", r"holds AdamW state but the optimizer runs SGD"),
    "ranks disagree": (None, r"incomplete checkpoint"),  # rank 0 loads "good", rank 1 "incomplete"
}


def bad_loads_world(directory: pathlib.Path) -> dict[str, tuple[str | None, bool]]:
    """Every bad load on every rank: the error, and whether the model and optimizer stayed as they were."""
    rank, _ = rank_and_world()
    outcomes = {}
    for case, (variant, _) in BAD.items():
        model_class = {"wider model": WiderNet, "renamed model": RenamedNet}.get(case)
        if case == "other algorithm":
            model, optimizer, scheduler = build("SGD", seed=1)
        elif model_class is None:
            model, optimizer, scheduler = build("AdamW", seed=1)
        else:
            torch.manual_seed(0)
            model = model_class()
            optimizer = shardopt.AdamW(model.parameters(), lr=1e-2)
            scheduler = None
        train(model, optimizer, scheduler or torch.optim.lr_scheduler.StepLR(optimizer, 1), range(1))
        before = (optimizer.state_dict(), flat_params(model))
        if variant is None:
            variant = "good" if rank == 0 else "incomplete"
        try:
            shardopt.checkpoint.load(directory / variant, model=model, optimizer=optimizer, scheduler=scheduler)
            message = None
        except CheckpointError as error:
            message = str(error)
        after = (optimizer.state_dict(), flat_params(model))
        try:  # bit for bit: state, param groups and parameters
            assert_identical(after, before)
            unchanged = True
        except AssertionError:
            unchanged = False
        outcomes[case] = (message, unchanged)
    return outcomes


@pytest.fixture(scope="module")
def bad_loads(runs: dict, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, tuple[str | None, bool]]]:
    directory = tmp_path_factory.mktemp("bad")
    good = runs["directory"] / "AdamW-n2"
    shutil.copytree(good, directory / "good")
    for variant in ("incomplete", "truncated", "corrupt"):
        shutil.copytree(good, directory / variant)
    (directory / "incomplete" / "COMPLETE").unlink()
    truncated = directory / "truncated" / "__1_0.distcp"
    os.truncate(truncated, truncated.stat().st_size // 2)
    corrupt = directory / "corrupt" / "__0_0.distcp"
    corrupt.write_bytes(bytes(corrupt.stat().st_size))  # same size: only reading it finds the damage
    return run_world(bad_loads_world, 2, directory)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_raises_on_every_rank_and_changes_nothing(bad_loads: list, case: str) -> None:
    for rank, outcomes in enumerate(bad_loads):
        message, unchanged = outcomes[case]
        assert message is not None, f"rank {rank} loaded the {case} checkpoint"
        assert re.search(BAD[case][1], message), f"rank {rank}: {message}"
        if case == "ranks disagree" and rank == 0:
            assert message.endswith("(reported by rank 1 of 2)"), message
        assert unchanged, f"rank {rank}: the failed load changed the model or optimizer"


def test_load_never_unpickles_objects(runs: dict, tmp_path: pathlib.Path) -> None:
    """A .metadata crafted to run code is refused before anything runs."""

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    shutil.copytree(runs["directory"] / "AdamW-n1", tmp_path / "evil")
    (tmp_path / "evil" / ".metadata").write_bytes(pickle.dumps(Payload()))
    model, optimizer, _ = build("AdamW")
    with pytest.raises(CheckpointError, match=r"evil/\.metadata asks to unpickle (posix|os)\.system"):
        shardopt.checkpoint.load(tmp_path / "evil", model=model, optimizer=optimizer)
    assert not (tmp_path / "pwned").exists()


def test_save_refuses_what_json_cannot_hold_and_writes_nothing(tmp_path: pathlib.Path) -> None:
    model, optimizer, _ = build("SGD")
    with pytest.raises(CheckpointError, match=r"extra\['callback'\]\[0\] is a builtins\.function"):
        shardopt.checkpoint.save(tmp_path / "c", model=model, optimizer=optimizer, extra={"callback": [lambda: 0, 1]})
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_replace_what_is_not_a_checkpoint(tmp_path: pathlib.Path) -> None:
    (tmp_path / "data").mkdir()
    model, optimizer, _ = build("SGD")
    with pytest.raises(CheckpointError, match=r"data exists and is not a complete shardopt checkpoint"):
        shardopt.checkpoint.save(tmp_path / "data", model=model, optimizer=optimizer)


# ---------------------------------------------------------------------- kill -9 during a save

SAVER = """
import sys, torch, shardopt
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])
optimizer = shardopt.AdamW(model.parameters(), lr=1e-3)
model(torch.randn(2, 512)).sum().backward()
optimizer.step()
for i in range(1, 1000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(i)
    shardopt.checkpoint.save(sys.argv[1], model=model, optimizer=optimizer, extra={"i": i})
    print(i, flush=True)
"""


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ckpt"
    saver = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path
    )
    try:
        for line in saver.stdout:
            if int(line) >= 2:  # path now holds a checkpoint the next save replaces
                break
        deadline = time.monotonic() + 60
        while not any(p.glob("*.distcp") for p in tmp_path.glob("ckpt.partial-*")):
            assert time.monotonic() < deadline and saver.poll() is None, "the saver never started a save"
            time.sleep(0.001)
        saver.send_signal(signal.SIGKILL)
    finally:
        saver.kill()
        saver.wait()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])
    optimizer = shardopt.AdamW(model.parameters(), lr=1e-3)
    extra = shardopt.checkpoint.load(path, model=model, optimizer=optimizer)
    assert all(bool((p == extra["i"]).all()) for p in model.parameters())
    partials = [p for p in tmp_path.glob("ckpt.partial-*") if not (p / "COMPLETE").exists()]
    assert partials, "the kill left no partial checkpoint"
    for partial in partials:
        with pytest.raises(CheckpointError, match="incomplete checkpoint"):
            shardopt.checkpoint.load(partial, model=model, optimizer=optimizer)


# ---------------------------------------------------------------------- edges, in one process


def test_a_save_replaces_the_previous_checkpoint_where_no_atomic_exchange_exists(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shardopt.checkpoint.storage, "_exchange", lambda a, b: False)
    model, optimizer, _ = build("SGD")
    for epoch in (1, 2):
        shardopt.checkpoint.save(tmp_path / "c", model=model, optimizer=optimizer, extra={"epoch": epoch})
    assert shardopt.checkpoint.load(tmp_path / "c", model=model, optimizer=optimizer) == {"epoch": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


class WithEmpty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.empty, self.linear = nn.Parameter(torch.zeros(0, 3)), nn.Linear(3, 2)


def test_a_parameter_of_no_elements_round_trips(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = WithEmpty()
    optimizer = shardopt.AdamW(model.parameters(), lr=0.1)
    (model.linear(torch.randn(4, 3)).sum() + model.empty.sum()).backward()
    optimizer.step()
    saved = optimizer.state_dict()
    shardopt.checkpoint.save(tmp_path / "c", model=model, optimizer=optimizer)
    model = WithEmpty()
    optimizer = shardopt.AdamW(model.parameters(), lr=0.5)
    shardopt.checkpoint.load(tmp_path / "c", model=model, optimizer=optimizer)
    assert_state_dicts_equal(optimizer.state_dict(), saved, "load", rtol=0, atol=0)
    assert_state_dicts_equal(shardopt.checkpoint.consolidate(tmp_path / "c")["optimizer"], saved, "export", 0, 0)


def test_load_torch_takes_a_plain_torch_optim_state_dict() -> None:
    model, optimizer, _ = build_torch("SGD")
    set_mean_grads(model, 1, 0)
    optimizer.step()
    sharded_model, sharded, _ = build("SGD")
    assert shardopt.checkpoint.load_torch(optimizer.state_dict(), optimizer=sharded) == {}
    assert_state_dicts_equal(sharded.state_dict(), optimizer.state_dict(), "load_torch", rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"holds no model state; call load_torch without model="):
        shardopt.checkpoint.load_torch(optimizer.state_dict(), optimizer=sharded, model=sharded_model)


def test_export_of_an_incomplete_checkpoint_fails_naming_it(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shardopt.checkpoint.__main__ import main

    (tmp_path / "c.partial-0").mkdir()
    assert main(["export", str(tmp_path / "c.partial-0"), str(tmp_path / "out.pt")]) == 1
    assert "c.partial-0 is an incomplete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
