"""A rank that dies mid-training: the others raise a clear error within the timeout, and the last
good checkpoint stays loadable.

The last rank of a 3-rank world exits abruptly (``os._exit``) in backward, in step() or just
before a checkpoint save; the survivors record what they raised and how long it took in files.
The world is spawned here rather than by tests.world, which ends a call as soon as a rank dies.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pathlib
import time
from datetime import timedelta
from typing import Any

import pytest

import shardopt
from shardopt import checkpoint
from tests.common import loss_of, make_model
from tests.world import run_world

TIMEOUT = 5  # seconds: the optimizer's bound on every collective
FAULTS = ("backward", "step", "save")
VICTIM_STEP = 2


def faulty_run(directory: pathlib.Path, fault: str) -> None:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    victim = rank == world - 1
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
            loss = loss_of(model, rank, step)
            if victim and step == VICTIM_STEP and fault == "backward":
                loss.register_hook(lambda grad: os._exit(3))
            loss.backward()
            if victim and step == VICTIM_STEP and fault == "step":
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


def _fault_rank(rank: int, world_size: int, directory: pathlib.Path, fault: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(str(directory / "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    faulty_run(directory, fault)
    os._exit(0)  # no teardown: the process group has a dead member


def run_with_a_death(directory: pathlib.Path, fault: str, world_size: int = 3) -> list[int | None]:
    """Each rank's exit code (None: still running after two minutes, then killed)."""
    context = mp.get_context("spawn")
    ranks = [
        context.Process(target=_fault_rank, args=(rank, world_size, directory, fault), daemon=True)
        for rank in range(world_size)
    ]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + 120
    codes = []
    for process in ranks:
        process.join(max(0.0, deadline - time.monotonic()))
        codes.append(process.exitcode)
        if process.is_alive():
            process.kill()
    return codes


def load_last_good(directory: pathlib.Path) -> float:
    model = make_model()
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2)
    checkpoint.load(directory / "last-good", model=model, optimizer=optimizer)
    return float(optimizer.state_dict()["state"][0]["step"])


@pytest.mark.parametrize("fault", FAULTS)
def test_a_dead_rank_is_an_error_on_every_other_rank_within_the_timeout(fault: str, tmp_path: pathlib.Path) -> None:
    assert run_with_a_death(tmp_path, fault) == [0, 0, 3]
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["error"] is not None, f"rank {rank} went on as if nothing happened ({fault})"
        assert "did not complete" in outcome["error"] or "died" in outcome["error"], outcome["error"]
        # The checkpoint save that completed after step 1 took some seconds too; the error itself
        # comes within the timeout.
        assert outcome["seconds"] < 3 * TIMEOUT + 10, outcome
    # The last checkpoint published before the death is whole and loads (at another world size).
    assert run_world(load_last_good, 2, tmp_path) == [VICTIM_STEP, VICTIM_STEP]
