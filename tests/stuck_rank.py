"""A world whose last rank stays alive but stops calling collectives after the first step: the
others raise shardopt's timeout error, then their processes must end, whatever the process group's
own timeout. tests/test_process_exit.py runs it as spawned processes and, as a script, under torchrun:

    torchrun --standalone --nproc-per-node 2 tests/stuck_rank.py DIRECTORY {caught,uncaught}
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from datetime import timedelta

import torch.distributed as dist

import shardopt
from tests.common import loss_of, make_model

TIMEOUT = 2  # seconds: shardopt's bound on every collective
GROUP_TIMEOUT = timedelta(minutes=10)  # the process group's own: longer than any test waits


def stuck_run(directory: pathlib.Path, catch: bool) -> None:
    """Every rank but the last: the error of the second step, and when it came (in rank<r>.json);
    with ``catch`` the error is caught and the process group destroyed, else the error ends the process."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = make_model()
    optimizer = shardopt.Adam(model.parameters(), lr=1e-2, timeout=TIMEOUT)
    loss_of(model, rank, 0).backward()
    optimizer.step()
    if rank == world_size - 1:
        time.sleep(GROUP_TIMEOUT.total_seconds())  # stuck: killed by the test, or by torchrun
    optimizer.zero_grad()
    try:
        loss_of(model, rank, 1).backward()
        optimizer.step()
        error = None
    except RuntimeError as caught:
        error = caught
    outcome = {"error": None if error is None else str(error), "at": time.time()}
    (directory / f"rank{rank}.json").write_text(json.dumps(outcome))
    if error is not None and not catch:
        raise error
    dist.destroy_process_group()


def spawned(rank: int, world_size: int, directory: pathlib.Path, catch: bool) -> None:
    from tests.processes import join_world

    join_world(rank, world_size, directory, timeout=GROUP_TIMEOUT.total_seconds())
    stuck_run(directory, catch)


if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    stuck_run(pathlib.Path(sys.argv[1]), sys.argv[2] == "caught")
