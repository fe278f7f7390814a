"""A rank that dies or gets stuck mid-training: the others raise a clear error within the timeout,
naming that rank and the last call it entered, and the last good checkpoint stays loadable.

The last rank of a 3-rank world exits abruptly (``os._exit``) in backward, in step() or just
before a checkpoint save, or stops (alive, calling nothing) before backward; or rank 0, hosting
the TCPStore, dies in step(). The survivors record what they raised and how long it took in
files. The world is spawned here rather than by tests.world, which ends a call as soon as a
rank dies.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import time
from typing import Any

import pytest

import shardopt
from shardopt import checkpoint
from shardopt.collectives.phases import UNREADABLE, Phase, Survey
from tests.common import loss_of, make_model
from tests.processes import free_port, join_world, run_ranks
from tests.world import run_world

TIMEOUT = 5  # seconds: the optimizer's bound on every collective
VICTIM_STEP = 2
# Per fault, the last call the victim entered (step() call 1 comes before the loop, and every step is
# followed by a checkpoint save): what the survivors' errors must say of it.
LAST_ENTERED = {
    "backward": f"checkpoint.save after {VICTIM_STEP} step() calls",
    # Dead after its backward, whose gradient reduction (stage 1, the default) is a call of its own.
    "step": f"backward after {VICTIM_STEP} step() calls",
    "save": f"step() call {VICTIM_STEP + 1}",
    "stuck": f"checkpoint.save after {VICTIM_STEP} step() calls",
}
CULPRITS = re.compile(r"\branks? ([\d, ]+) did not answer")
# Rank 0 hosts the world's TCPStore (as without torchrun) and dies in step(): the phase board goes with it.
STORE_HOST = "store host"


def faulty_run(directory: pathlib.Path, fault: str) -> None:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    victim = rank == (0 if fault == STORE_HOST else world - 1)
    model = make_model()
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2, timeout=TIMEOUT)
    optimizer.zero_grad()
    loss_of(model, rank, 0).backward()
    optimizer.step()
    checkpoint.save(directory / "last-good", model=model, optimizer=optimizer)
    started = time.monotonic()
    try:
        for step in range(1, 4):
            optimizer.zero_grad()
            if victim and step == VICTIM_STEP and fault == "stuck":
                # Alive, but calling nothing until the others have given up (each has written its outcome).
                while not all((directory / f"rank{other}.json").exists() for other in range(world) if other != rank):
                    time.sleep(0.1)
                os._exit(3)
            loss = loss_of(model, rank, step)
            if victim and step == VICTIM_STEP and fault == "backward":
                loss.register_hook(lambda grad: os._exit(3))
            loss.backward()
            if victim and step == VICTIM_STEP and fault in ("step", STORE_HOST):
                os._exit(3)
            optimizer.step()
            if victim and step == VICTIM_STEP and fault == "save":
                os._exit(3)
            checkpoint.save(directory / "last-good", model=model, optimizer=optimizer)
        outcome: dict[str, Any] = {"error": None}
    except Exception as error:
        outcome = {"error": f"{type(error).__name__}: {error}"}
    outcome["seconds"] = time.monotonic() - started
    (directory / f"rank{rank}.json").write_text(json.dumps(outcome))


def _fault_rank(rank: int, world_size: int, directory: pathlib.Path, fault: str, port: int) -> None:
    join_world(rank, world_size, directory, port if fault == STORE_HOST else None)
    faulty_run(directory, fault)
    os._exit(0)  # no teardown: the process group has a dead member


def run_with_a_death(directory: pathlib.Path, fault: str, world_size: int = 3) -> list[int | None]:
    """Each rank's exit code (None: still running after two minutes, then killed)."""
    return run_ranks(_fault_rank, world_size, directory, fault, free_port())


def load_last_good(directory: pathlib.Path) -> float:
    model = make_model()
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2)
    checkpoint.load(directory / "last-good", model=model, optimizer=optimizer)
    return float(optimizer.state_dict()["state"][0]["step"])


@pytest.mark.parametrize("fault", LAST_ENTERED)
def test_a_dead_or_stuck_rank_is_an_error_naming_it_on_every_other_rank(fault: str, tmp_path: pathlib.Path) -> None:
    assert run_with_a_death(tmp_path, fault) == [0, 0, 3]
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())  # the error, and the seconds to it
        error = outcome["error"]
        assert error is not None, f"rank {rank} went on as if nothing happened ({fault})"
        assert error.startswith("RuntimeError: shardopt: ") and "did not complete" in error, outcome
        culprits = CULPRITS.search(error)
        assert culprits is not None and culprits.group(1) == "2", outcome
        last = f"the last call rank 2 entered is {LAST_ENTERED[fault]} (this rank and rank {1 - rank} are in "
        assert last in error, outcome
    # The last checkpoint published before the death is whole and loads (at another world size).
    assert run_world(load_last_good, 2, tmp_path) == [VICTIM_STEP, VICTIM_STEP]


def test_a_dead_store_host_is_said_rather_than_waited_for(tmp_path: pathlib.Path) -> None:
    assert run_with_a_death(tmp_path, STORE_HOST) == [3, 0, 0]
    for rank in (1, 2):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        error = outcome["error"]
        assert error is not None and error.startswith("RuntimeError: shardopt: "), outcome
        assert f"did not complete (the timeout is {TIMEOUT} s): {UNREADABLE}: " in error, outcome


def test_the_board_names_the_ranks_behind_and_those_in_another_call() -> None:
    """What a rank in step() call 3 makes of the others' entries (pure: no process group)."""
    mine = Phase(3, 3, "step()")
    assert Phase.decode(mine.encode()) == mine
    behind = Survey(mine, 0, {0: mine, 1: mine, 2: Phase(2, 2, "checkpoint.save"), 3: None})
    assert (behind.behind, behind.astray) == ([2, 3], [])
    assert behind.explain() == (
        "ranks 2, 3 did not answer: the last call rank 2 entered is checkpoint.save after 2 step() calls; "
        "rank 3 posted nothing on the phase board (this rank and rank 1 are in step() call 3)"
    )
    together = Survey(mine, 1, {0: mine, 1: mine})
    assert together.explain().startswith("every rank is in step() call 3: one of them may be stuck inside it")
    # Entered as many calls, but this one is a state_dict() after one step fewer: a desync, not a delay.
    elsewhere = Survey(Phase(3, 2, "state_dict()"), 0, {0: Phase(3, 2, "state_dict()"), 1: mine})
    assert elsewhere.astray == [1]
    story = elsewhere.explain()
    assert story.endswith("rank 0 is in state_dict() after 2 step() calls while rank 1 is in step() call 3"), story


def _construct_alone(rank: int, world_size: int, directory: pathlib.Path) -> None:
    import torch.distributed as dist

    join_world(rank, world_size, directory)
    if rank == 0:  # the first optimizer of the world: it creates shardopt's process group (own_group.py)
        try:
            shardopt.Adam(make_model().parameters(), lr=1e-2, timeout=2)
            error = "no error"
        except RuntimeError as caught:
            error = str(caught)
        (directory / "rank0.txt").write_text(error)
    dist.barrier()  # rank 1 waits here until rank 0 has its error
    os._exit(0)


def test_a_rank_that_does_not_build_the_first_optimizer_is_named(tmp_path: pathlib.Path) -> None:
    """Rank 1 never builds the optimizer rank 0 builds: rank 0's error names rank 1 after the timeout
    (not torch's "wait timeout after 4000ms, keys: /default_pg/0//..." of the group's creation)."""
    assert run_ranks(_construct_alone, 2, tmp_path) == [0, 0]
    error = (tmp_path / "rank0.txt").read_text()
    assert error.startswith("shardopt: the creation of shardopt's process group on rank 0 of 2 did not complete"), error
    assert "rank 1 did not answer: rank 1 posted nothing on the phase board" in error, error
