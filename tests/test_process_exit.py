"""Every process ends: after a normal run that destroys its process group, and after shardopt's
timeout error. The ranks are separate processes that end as a user's script would (tests.processes)."""

from __future__ import annotations

import gc
import json
import pathlib
import weakref

import shardopt
from tests.common import loss_of, make_model
from tests.processes import join_world, run_ranks


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
