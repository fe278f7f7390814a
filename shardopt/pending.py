"""An issued collective that is waited later: the handle every asynchronous collective returns."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from .comm import Comm


class Pending:
    """An issued collective; ``wait()`` bounds it by the group's timeout, names it in the error,
    and then runs what completes it on this rank (``then``)."""

    def __init__(self, comm: Comm, work: dist.Work | None, what: str, then: Callable[[], None] | None = None) -> None:
        self._comm, self._work, self.what, self._then = comm, work, what, then

    def wait(self) -> None:
        work, then = self._work, self._then
        self._work = self._then = None
        if work is not None:
            self._comm.wait(work, self.what)
        if then is not None:
            then()
