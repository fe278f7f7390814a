"""An issued collective that is waited later: the handle every asynchronous collective returns;
and what the modules below ``comm.py`` need of its ``Comm`` (they cannot import it: it imports them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor


class Link(Protocol):
    """The part of ``comm.Comm`` that pending collectives, the ring and the agreement use."""

    rank: int
    world_size: int

    @property
    def group(self) -> dist.ProcessGroup | None: ...

    @property
    def device(self) -> torch.device: ...

    def wait(self, work: dist.Work | None, what: str) -> None: ...

    def all_reduce_(self, tensor: Tensor, what: str, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Pending: ...


class Pending:
    """An issued collective; ``wait()`` bounds it by the group's timeout, names it in the error,
    and then runs what completes it on this rank (``then``)."""

    def __init__(self, comm: Link, work: dist.Work | None, what: str, then: Callable[[], None] | None = None) -> None:
        self._comm, self._work, self.what, self._then = comm, work, what, then

    def wait(self) -> None:
        work, then = self._work, self._then
        self._work = self._then = None
        if work is not None:
            self._comm.wait(work, self.what)
        if then is not None:
            then()
