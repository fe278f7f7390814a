"""Saves written by a background thread (``save(..., async_save=True)``), and what becomes of them
when the process ends.

A save in flight when the process ends is completed first: the interpreter joins the writer's
thread before it exits. One that failed (say its process group was destroyed under it, by
``dist.destroy_process_group()`` before ``future.result()``) and whose result nobody asked for is
said on stderr at exit, on every rank it failed on: never dropped in silence.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from ..collectives.comm import Comm


class SaveFuture(Future):  # type: ignore[type-arg]
    """The future of a background save: completes when the checkpoint is in place; ``result()``
    raises CheckpointError where the save failed."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.asked = False

    def result(self, timeout: float | None = None) -> Any:
        self.asked = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.asked = True
        return super().exception(timeout)


# The background saves of this process that failed, with their errors: at exit, those nobody asked about
# are said.
_FAILED: list[tuple[SaveFuture, BaseException]] = []


@atexit.register
def _report_unasked_failures() -> None:
    """At exit, after the interpreter joined the writers' threads: say every failed save nobody asked about."""
    for save, error in _FAILED:
        if not save.asked:
            sys.stderr.write(
                f"shardopt: the background checkpoint save to {save.path} failed, and the program ended without "
                f"asking its future for the result: the checkpoint was NOT saved ({type(error).__name__}: {error}). "
                "Call future.result() before dist.destroy_process_group() and the end of the program\n"
            )
    sys.stderr.flush()


@dataclass
class AsyncWriter:
    """A background thread that writes an optimizer's checkpoints one after another, and a
    process group of its own, so its collectives never interleave with training's."""

    comm: Comm
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardopt-checkpoint")
    )

    @classmethod
    def over(cls, comm: Comm) -> AsyncWriter:
        """A writer for the optimizers on ``comm`` (collective: it creates the process group)."""
        group = None
        if comm.group is not None:
            group = dist.new_group(
                dist.get_process_group_ranks(comm.group), backend="gloo", use_local_synchronization=True
            )
        return cls(Comm(group, comm.timeout))

    def submit(self, path: str, write: Callable[[Comm], None]) -> SaveFuture:
        """``write(comm)`` on the writer's thread, after the saves submitted before it."""
        save = SaveFuture(path)
        done = self.executor.submit(write, self.comm)

        def settle(outcome: Future[None]) -> None:
            error = outcome.exception()
            if error is None:
                save.set_result(None)
            else:
                _FAILED.append((save, error))
                save.set_exception(error)

        done.add_done_callback(settle)
        return save

    def wait(self) -> None:
        """Until every save submitted so far is done (whatever its outcome)."""
        self.executor.submit(lambda: None).result()
