"""Run a function on N real gloo ranks (spawned processes on loopback) and return each rank's result.

A rank costs seconds to start (a new interpreter imports torch and joins a process group), so
worlds are kept: one per world size, spawned on first use and reused by later calls for the
whole session. A world that may carry something over from a call (a rank raised, hung or died,
the ranks fell out of step, or the function changed process-wide state) is discarded, and the
next call spawns a new one. ``fresh=True`` gives a call a world of its own, as every call had once.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing as mp
import os
import pickle
import queue
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

# gloo binds to the address the host name resolves to unless told otherwise; tests stay on loopback.
LOOPBACK_INTERFACE = "lo"
PROCESS_GROUP_TIMEOUT = timedelta(seconds=120)
# How long a rank waits for the others at the barriers around a reused world's calls. Ranks that do
# not meet by then are out of step (a collective left pending on some of them): the world is dropped.
BARRIER_TIMEOUT = timedelta(seconds=30)
# Changes of the environment that make no difference to a rank; any other change of the parent's
# environment needs a world spawned in it, and one a call makes in a rank ends that rank's world.
IGNORED_VARIABLES = (
    "PYTEST_CURRENT_TEST",  # set by pytest for every test
    # Set by torch for its own use the first time a process compiles (or saves a checkpoint).
    "TORCHINDUCTOR_CACHE_DIR",  # the default it uses anyway
    "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",  # an address in that process
)


# ---------------------------------------------------------------------- in each rank


def _rank_main(rank: int, world_size: int, store_path: str, tasks: Connection, results: Any) -> None:
    """Join the world, then run the calls the parent sends until it is gone (or kills this process)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_INTERFACE)
    try:
        import torch
        import torch.distributed as dist

        # Imported before any call: the warning filter shardopt.checkpoint sets on import would
        # otherwise end with the call that first imports it, as the filters every call sets do.
        import shardopt.checkpoint  # noqa: F401
        from shardopt.elements import kernels

        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT)
    except BaseException:  # reported as the failure of the first call
        results.put((rank, False, traceback.format_exc(), False))
        return
    initial_rng = torch.get_rng_state()
    while True:
        try:
            task = tasks.recv_bytes()
        except EOFError:  # the parent is gone
            return
        # What a call sees of a new process: torch's initial random state, no warning given yet.
        torch.set_rng_state(initial_rng)
        kernels._warn_once.cache_clear()
        results.put((rank, *_run_task(task)))


def _run_task(task: bytes) -> tuple[bool, bytes | str, bool]:
    """One call: whether it succeeded, the pickled result or the traceback, and whether this rank's
    process can take the next call (only checked where the world is meant to be reused)."""
    modules = _own_modules()
    before = _process_state(modules)  # before unpickling fn, which may import its module
    try:
        fn, args, reuse = pickle.loads(task)
        if reuse:
            _barrier()  # every rank starts from the same point
        with warnings.catch_warnings():  # filters a call sets end with it; "once" warnings show again
            # Plain pickle bytes: torch would otherwise share tensors through this process's memory,
            # which is gone once the world is.
            value = pickle.dumps(fn(*args))
    except BaseException:  # the parent re-raises it with the rank's traceback
        return False, traceback.format_exc(), False
    if not reuse:
        return True, value, False
    try:
        _barrier()
        reusable = _process_state(modules) == before
    except Exception:  # out of step, or the process group is gone
        reusable = False
    return True, value, reusable


def _environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in IGNORED_VARIABLES}


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier(async_op=True).wait(timeout=BARRIER_TIMEOUT)


def _own_modules() -> list[str]:
    return [name for name in list(sys.modules) if name.split(".")[0] in ("shardopt", "tests")]


def _process_state(modules: list[str]) -> dict[str, Any]:
    """What a call could leave behind in its process for the next call to trip over."""
    import torch
    import torch.distributed as dist
    from torch.nn.modules import module

    from shardopt.collectives.own_group import own_groups
    from shardopt.shared.hook_handles import sweep

    # What the call dropped is collected, and its hooks removed, as a later call would find them.
    gc.collect()
    sweep()
    own = {id(group) for group in own_groups()}
    return {
        "torch": (
            torch.get_default_dtype(),
            torch.get_num_threads(),
            torch.is_grad_enabled(),
            torch.is_anomaly_enabled(),
            torch.are_deterministic_algorithms_enabled(),
        ),
        # e.g. the forward pre-hook of overlap_param_gather=True, which must remove itself
        "global module hooks": {
            name: list(hooks)
            for name, hooks in vars(module).items()
            if name.startswith("_global_") and isinstance(hooks, dict)
        },
        # e.g. the group of an async checkpoint writer; not the groups shardopt runs its collectives on, which
        # serve every later optimizer over the world (own_group.py)
        "process groups": [id(group) for group in dist.distributed_c10d._world.pg_map if id(group) not in own],
        # e.g. an async checkpoint writer's; not daemons such as the progress monitor torch's compiler starts
        "threads": sum(not thread.daemon for thread in threading.enumerate()),
        "environment": _environment(),
        "cwd": os.getcwd(),
        # A rebound module global (comm.ALL_GATHER_VIA_ALL_REDUCE_NUMEL = 0); not the warning registries
        # in dunders, nor the submodules a package gains as they are imported.
        "globals": {
            name: {
                key: id(value)
                for key, value in vars(sys.modules[name]).items()
                if not key.startswith("__") and not isinstance(value, types.ModuleType)
            }
            for name in modules
        },
    }


# ---------------------------------------------------------------------- in the parent


class _World:
    """The ranks of one gloo world, each with a pipe for calls; their answers come back on one queue."""

    def __init__(self, world_size: int) -> None:
        context = mp.get_context("spawn")
        self.world_size = world_size
        self._spawned_in = (_environment(), os.getcwd(), list(sys.path))  # what its ranks took over from here
        self._directory = tempfile.TemporaryDirectory()
        self._results = context.Queue()
        self._tasks: list[Connection] = []
        self._processes: list[mp.process.BaseProcess] = []
        store_path = os.path.join(self._directory.name, "store")
        for rank in range(world_size):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_rank_main, args=(rank, world_size, store_path, receiver, self._results), daemon=True
            )
            process.start()
            receiver.close()  # the rank holds the only other end: its recv sees EOF once this process is gone
            self._tasks.append(sender)
            self._processes.append(process)

    def fits(self) -> bool:
        """Whether a rank spawned now would start as this world's did. Entries appended to sys.path
        since (setuptools adds its vendored packages when torch compiles) serve only modules no
        earlier entry has."""
        environment, cwd, path = self._spawned_in
        return environment == _environment() and cwd == os.getcwd() and sys.path[: len(path)] == path

    def call(self, fn: Callable[..., Any], args: tuple, timeout: float, reuse: bool) -> tuple[list[Any], bool]:
        """Every rank's result, and whether the world can take another call; AssertionError if a rank
        raised, died or did not answer within ``timeout`` seconds."""
        task = pickle.dumps((fn, args, reuse))
        for sender in self._tasks:
            try:
                sender.send_bytes(task)
            except OSError:  # this rank is gone; the wait below reports it
                pass
        deadline = time.monotonic() + timeout
        results: dict[int, Any] = {}
        reusable, last_look = reuse, False
        while len(results) < self.world_size:
            missing = sorted(set(range(self.world_size)) - set(results))
            try:
                rank, ok, value, rank_reusable = self._results.get(timeout=1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no answer from {missing} of {self.world_size} within {timeout} s") from None
                exits = {rank: self._processes[rank].exitcode for rank in missing}
                dead = {rank: code for rank, code in exits.items() if code is not None}
                if dead and last_look:
                    raise AssertionError(f"ranks of {self.world_size} died (rank: exit code): {dead}") from None
                last_look = bool(dead)  # one more wait: what a rank sent just before it died may be on its way
                continue
            if not ok:
                raise AssertionError(f"rank {rank} of {self.world_size} raised:\n{value}")
            results[rank] = pickle.loads(value)
            reusable = reusable and rank_reusable
        return [results[rank] for rank in range(self.world_size)], reusable

    def kill(self) -> None:
        """No need to leave the process group first: every rank of it goes."""
        for process in self._processes:
            if process.is_alive():
                process.kill()
            process.join()
        for sender in self._tasks:
            sender.close()
        self._results.close()
        self._directory.cleanup()


_worlds: dict[int, _World] = {}  # by world size: the worlds the next calls reuse


@atexit.register
def _kill_worlds() -> None:
    while _worlds:
        _worlds.popitem()[1].kill()


def run_world(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240, fresh: bool = False
) -> list[Any]:
    """``fn(*args)`` on every rank of a gloo world; the ranks' return values, by rank.

    ``fn`` must be importable (a module-level function) and return something picklable.
    A rank that raises makes this raise with that rank's traceback. The world is one that earlier
    calls used unless ``fresh``: pass that for a function that cannot share its process (it leaves
    collectives pending, changes process-wide state, or needs a process no call has used).
    """
    world = None if fresh else _worlds.pop(world_size, None)
    if world is not None and not world.fits():
        world.kill()
        world = None
    if world is None:
        world = _World(world_size)
    reusable = False  # until the call says otherwise: a rank failed, or the call was interrupted
    try:
        results, reusable = world.call(fn, args, timeout, reuse=not fresh)
    finally:
        if reusable:
            _worlds[world_size] = world
        else:
            world.kill()
    return results
