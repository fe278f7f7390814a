"""The one error a checkpoint operation raises, and how every rank comes to raise it."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..collectives.comm import Comm

# Characters of an error message the ranks exchange; longer ones are cut.
MESSAGE_CHARS = 2000


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded: the message names the file and the problem."""


def describe(error: BaseException) -> str:
    """The message of ``error``; for DCP's collective exception, that of its lowest failing rank."""
    if isinstance(error, CheckpointException):
        first, _ = error.failures[min(error.failures)]
        return describe(first)
    if isinstance(error, CheckpointError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def agree(comm: Comm, error: BaseException | None, what: str) -> None:
    """Collective: raise :class:`CheckpointError` on every rank if any rank has an ``error``.

    Before: each rank knows only its own outcome. After: every rank raises the message
    of the lowest failing rank (chained to its own error where it had one), or none
    does; so no rank goes on into a collective the others have left.
    """
    if comm.world_size == 1:
        if error is not None:
            raise CheckpointError(describe(error)) from error
        return
    # One row per rank: [failed, code points of the message...]; each rank fills its own row.
    rows = torch.zeros(comm.world_size, 1 + MESSAGE_CHARS, dtype=torch.int32)
    if error is not None:
        message = describe(error)[:MESSAGE_CHARS]
        rows[comm.rank, 0] = 1
        rows[comm.rank, 1 : 1 + len(message)] = torch.tensor([ord(c) for c in message], dtype=torch.int32)
    rows = rows.to(comm.device)
    comm.all_reduce_(rows, f"the agreement on the outcome of {what}").wait()
    rows = rows.cpu()
    failed = rows[:, 0].nonzero()
    if len(failed) == 0:
        return
    rank = int(failed[0])
    message = "".join(chr(c) for c in rows[rank, 1:].tolist() if c)
    if rank != comm.rank:
        message = f"{message} (reported by rank {rank} of {comm.world_size})"
    raise CheckpointError(message) from error
