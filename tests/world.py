"""Run a function on N real gloo ranks (spawned processes on loopback) and return each rank's result."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

# gloo binds to the address the host name resolves to unless told otherwise; tests stay on loopback.
LOOPBACK_INTERFACE = "lo"


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, store_path: str, args: tuple, queue: Any) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_INTERFACE)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        try:
            # Plain pickle bytes: torch would otherwise share tensors through this process's memory,
            # which is gone once it exits.
            queue.put((rank, True, pickle.dumps(fn(*args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # the parent re-raises it with the rank's traceback
        queue.put((rank, False, traceback.format_exc()))


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240) -> list[Any]:
    """``fn(*args)`` on every rank of a fresh gloo world; the ranks' return values, by rank.

    ``fn`` must be importable (a module-level function) and return something picklable.
    A rank that raises makes this raise with that rank's traceback.
    """
    context = mp.get_context("spawn")
    queue = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        processes = [
            context.Process(target=_rank_main, args=(fn, rank, world_size, store_path, args, queue), daemon=True)
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        results: dict[int, Any] = {}
        failures: list[str] = []
        try:
            for _ in range(world_size):
                rank, ok, value = queue.get(timeout=timeout)
                if ok:
                    results[rank] = pickle.loads(value)
                else:
                    failures.append(f"rank {rank} of {world_size} raised:\n{value}")
                    break
        except Exception as error:  # queue.Empty: a rank hung or died without a word
            failures.append(
                f"no answer from {sorted(set(range(world_size)) - set(results))} within {timeout} s: {error!r}"
            )
        finally:
            for process in processes:
                process.join(timeout=5 if not failures else 0.5)
                if process.is_alive():
                    process.kill()
                    process.join()
    if failures:
        raise AssertionError("\n".join(failures))
    return [results[rank] for rank in range(world_size)]
