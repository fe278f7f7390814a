"""Ranks as separate processes that end as a user's would: the tests of what a process does at its
end (or on a fault) spawn their worlds here rather than with tests.world, which keeps its ranks."""

from __future__ import annotations

import multiprocessing as mp
import os
import pathlib
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.process import BaseProcess
from typing import Any


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def join_world(
    rank: int, world_size: int, directory: pathlib.Path, port: int | None = None, timeout: float = 60
) -> None:
    """This process joins a gloo world on loopback: its store a file in ``directory``, or with ``port`` a
    TCPStore hosted by rank 0 (as without torchrun)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if port is None:
        store: dist.Store = dist.FileStore(str(directory / "store"), world_size)
    else:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))


def start_ranks(target: Callable[..., None], world_size: int, *args: Any) -> list[BaseProcess]:
    """``target(rank, world_size, *args)`` in a spawned process per rank, started."""
    context = mp.get_context("spawn")
    ranks = [context.Process(target=target, args=(rank, world_size, *args), daemon=True) for rank in range(world_size)]
    for process in ranks:
        process.start()
    return ranks


def run_ranks(target: Callable[..., None], world_size: int, *args: Any, deadline: float = 120) -> list[int | None]:
    """``target(rank, world_size, *args)`` in a spawned process per rank; each one's exit code (None:
    still running after ``deadline`` seconds, then killed)."""
    end = time.monotonic() + deadline
    codes = []
    for process in start_ranks(target, world_size, *args):
        process.join(max(0.0, end - time.monotonic()))
        codes.append(process.exitcode)
        if process.is_alive():
            process.kill()
    return codes
