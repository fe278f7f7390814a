"""Every process ends: after a normal run that destroys its process group, and after shardopt's
timeout error. The ranks are separate processes that end as a user's script would (tests.processes)."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import weakref

import pytest

import shardopt
from shardopt import checkpoint
from tests import stuck_rank
from tests.common import loss_of, make_model
from tests.processes import join_world, run_ranks, start_ranks

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _destroy_then_exit(rank: int, world_size: int, directory: pathlib.Path) -> None:
    import torch.distributed as dist

    join_world(rank, world_size, directory)
    model = make_model()
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2)
    loss_of(model, rank, 0).backward()
    optimizer.step()
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()
    outcome = {"group_kept": group() is not None, "error": None}
    try:
        optimizer.step()
    except RuntimeError as error:
        outcome["error"] = str(error)
    (directory / f"rank{rank}.json").write_text(json.dumps(outcome))
    # The optimizer is still alive here, and the process ends through the interpreter's own exit.


def test_a_destroyed_process_group_is_let_go_and_named_by_the_next_step(tmp_path: pathlib.Path) -> None:
    """An optimizer that outlives dist.destroy_process_group() does not keep the group: a group kept
    alive is destroyed at interpreter exit, where gloo's worker thread, still releasing the tensors of
    the last collective, cannot take the GIL, and the process aborts (SIGABRT, exit code -6) in some
    runs. With the group let go, its destructor joins those threads inside destroy_process_group()."""
    assert run_ranks(_destroy_then_exit, 2, tmp_path) == [0, 0]
    for rank in range(2):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not outcome["group_kept"], f"rank {rank}: the optimizer kept the destroyed process group alive"
        assert outcome["error"] is not None and "dist.destroy_process_group()" in outcome["error"], outcome


# Seconds a survivor's process may take to end after shardopt's timeout error (the bound).
EXIT_BOUND = 30


def assert_timed_out_then_ended(directory: pathlib.Path, ended_at: float) -> None:
    outcome = json.loads((directory / "rank0.json").read_text())
    assert outcome["error"] is not None and outcome["error"].startswith("shardopt: "), outcome
    assert "rank 1 did not answer" in outcome["error"], outcome
    assert ended_at - outcome["at"] < EXIT_BOUND, f"the process ended {ended_at - outcome['at']:.0f} s after its error"


@pytest.mark.parametrize("catch", [True, False], ids=["caught-then-destroyed", "uncaught"])
def test_a_survivor_of_a_stuck_rank_ends_after_the_timeout_error(catch: bool, tmp_path: pathlib.Path) -> None:
    """Rank 1 stops calling collectives; rank 0 raises shardopt's timeout error after 2 s and its process
    ends soon after, though the process group's own timeout is 10 minutes: gloo's worker thread, blocked
    in the collective rank 1 never joined, is on a group of shardopt's whose timeout is shardopt's."""
    survivor, stuck = start_ranks(stuck_rank.spawned, 2, tmp_path, catch)
    survivor.join(EXIT_BOUND + 60)  # the start of a process, a step, the timeout, the bound
    ended_at = time.time()
    alive = survivor.is_alive()
    for process in (survivor, stuck):
        process.kill()
    assert not alive, "rank 0 was still running a minute and a half after it started"
    assert survivor.exitcode == (0 if catch else 1)
    assert_timed_out_then_ended(tmp_path, ended_at)


def test_torchrun_ends_the_job_after_the_timeout_error(tmp_path: pathlib.Path) -> None:
    """As above, under torchrun with the error uncaught: rank 0's process ends, and torchrun stops the
    stuck rank and exits with the failure."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(pathlib.Path(stuck_rank.__file__)), str(tmp_path), "uncaught"]
    environment = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = job.communicate(timeout=EXIT_BOUND + 60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # torchrun and both ranks
        job.communicate()
        pytest.fail("torchrun was still running a minute and a half after it started")
    assert job.returncode != 0, stderr[-2000:]
    assert_timed_out_then_ended(tmp_path, time.time())


def _save_then_end(rank: int, world_size: int, directory: pathlib.Path, destroy: bool) -> None:
    import torch.distributed as dist

    sys.stderr = open(directory / f"rank{rank}.err", "w")
    join_world(rank, world_size, directory)
    model = make_model()
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2)
    loss_of(model, rank, 0).backward()
    optimizer.step()
    checkpoint.save(directory / "checkpoint", model=model, optimizer=optimizer, async_save=True)
    if destroy:
        dist.destroy_process_group()  # under the save in flight, whose future nobody asks


@pytest.mark.parametrize("destroy", [False, True], ids=["exit", "destroy-then-exit"])
def test_a_background_save_in_flight_at_exit_is_completed_or_said(destroy: bool, tmp_path: pathlib.Path) -> None:
    """A background save whose future nobody asks: ending the program completes it first. Where the process
    group is destroyed under it (the save then fails, or completed just before), every rank says so on
    stderr: the checkpoint is in place, or every rank told that it is not."""
    assert run_ranks(_save_then_end, 2, tmp_path, destroy) == [0, 0]
    said = [(tmp_path / f"rank{rank}.err").read_text() for rank in range(2)]
    reports = ["shardopt: the background checkpoint save to " in text for text in said]
    if checkpoint.is_complete(tmp_path / "checkpoint"):
        assert reports == [False, False], said
    else:
        assert destroy and reports == [True, True], said
    assert not list(tmp_path.glob("checkpoint.partial-*"))  # a failed save removes what it wrote
