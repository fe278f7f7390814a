"""Reduce-scatter and all-gather as rings of point-to-point messages: how shardopt moves them on gloo.

gloo's own reduce-scatter and all-gather are slower than its all-reduce, and its all-reduce
moves twice the bytes a reduce-scatter must (2 ranks on loopback, 50M fp32, one thread each:
reduce_scatter_tensor 516 ms, all_gather_into_tensor 420 ms, all_reduce 288 ms; these rings
124 ms and 158 ms). A ring of N ranks takes N-1 steps: at each, rank r sends one chunk to rank
r+1 and receives one from rank r-1, so every rank sends (N-1)/N of the buffer, what NCCL's
ring sends. Each chunk travels in pieces of at most about :data:`PIECE_BYTES`, so that adding one
piece overlaps receiving the next. With 2 ranks the one step is in flight as soon as it is issued;
with more, :meth:`Ring.wait` drives the later steps (each needs the chunk the step before
received), so every rank must wait its rings in the order it issued them, as it does.

The chunk arithmetic is pure (:func:`reduce_scatter_chunks`, :func:`all_gather_chunks`,
:func:`pieces`) and tested without processes.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from .pending import Pending

if TYPE_CHECKING:
    from .comm import Comm

#: Bytes per message. Pieces let the add of one overlap receiving the next where one large buffer is
#: in flight alone (50M fp32, 2 ranks: 181 ms in one message, 124 ms in 1 MiB pieces); with many
#: buckets in flight each message's own cost dominates (23 buckets of 4M fp32: reduce-scatter 213 ms
#: in 1 MiB pieces, 187 ms in 8 MiB; all-gather 162 and 128 ms).
PIECE_BYTES = 8 << 20
# Tags of ring messages: bit 30 set, clear of the small tags users give their own send/recv; the low 30
# bits count the messages of a process group, in issue order, which is the same on every rank.
_TAG_BIT, _TAG_MASK = 1 << 30, (1 << 30) - 1
_messages: defaultdict[str, int] = defaultdict(int)


def reserve_tags(comm: Comm, count: int) -> int:
    """The first of ``count`` consecutive message numbers for one collective of ``comm``'s group; pass
    each through :func:`tag`. Every rank issues its collectives in the same order, so gets the same."""
    group = comm.group.group_name if comm.group is not None else ""
    first = _messages[group]
    _messages[group] += count
    return first


def tag(number: int) -> int:
    """The point-to-point tag of message ``number``."""
    return _TAG_BIT | (number & _TAG_MASK)


def reduce_scatter_chunks(rank: int, world_size: int, step: int) -> tuple[int, int]:
    """(chunk rank ``rank`` sends, chunk it receives and adds to its own) at ``step`` of a reduce-scatter
    ring; after ``world_size - 1`` steps it holds the sum of every rank's chunk ``rank``."""
    return (rank - step - 1) % world_size, (rank - step - 2) % world_size


def all_gather_chunks(rank: int, world_size: int, step: int) -> tuple[int, int]:
    """(chunk rank ``rank`` sends, chunk it receives) at ``step`` of an all-gather ring: first its own
    chunk, then each chunk it received the step before."""
    return (rank - step) % world_size, (rank - step - 1) % world_size


def pieces(numel: int, itemsize: int, piece_bytes: int = PIECE_BYTES) -> list[slice]:
    """``numel`` elements cut into near-equal pieces of at most about ``piece_bytes`` each."""
    count = max(1, -(-numel * itemsize // piece_bytes))
    count = min(count, max(numel, 1))
    bounds = [numel * i // count for i in range(count + 1)]
    return [slice(start, end) for start, end in itertools.pairwise(bounds)]


class Ring(Pending):
    """One reduce-scatter (``reduce=True``) or all-gather of ``full`` over ``comm``'s group, by chunks of
    ``shard.numel()``; ``wait()`` completes it. Reduce-scatter sums ``full`` in place on the way."""

    def __init__(self, comm: Comm, full: Tensor, shard: Tensor, what: str, *, reduce: bool) -> None:
        super().__init__(comm, None, what)
        self._full, self._shard, self._reduce = full, shard, reduce
        self._n = shard.numel()
        self._pieces = pieces(self._n, full.element_size(), PIECE_BYTES)
        rank, world = comm.rank, comm.world_size
        self._next = dist.get_global_rank(comm.group, (rank + 1) % world)
        self._previous = dist.get_global_rank(comm.group, (rank - 1) % world)
        self._first_tag = reserve_tags(comm, (world - 1) * len(self._pieces))  # one per message
        self._sends: list[dist.Work] = []
        self._receives: list[dist.Work | None] = [None] * len(self._pieces)
        for piece in range(len(self._pieces)):
            self._post(0, piece)

    def _chunk(self, index: int) -> Tensor:
        return self._full[index * self._n : (index + 1) * self._n]

    def _tag(self, step: int, piece: int) -> int:
        return tag(self._first_tag + step * len(self._pieces) + piece)

    def _post(self, step: int, piece: int) -> None:
        """Send piece ``piece`` of this step's outgoing chunk and post the receive of its incoming one."""
        rank, world = self._comm.rank, self._comm.world_size
        part, number, group = self._pieces[piece], self._tag(step, piece), self._comm.group
        if self._reduce:
            send, receive = reduce_scatter_chunks(rank, world, step)
            # Received into the shard itself (not a part of ``full``): the last step's sum ends there,
            # and a piece's next receive is posted only once the piece is added.
            outgoing, incoming = self._chunk(send), self._shard
        else:
            send, receive = all_gather_chunks(rank, world, step)
            outgoing = self._shard if step == 0 else self._chunk(send)
            incoming = self._chunk(receive)
        self._sends.append(dist.isend(outgoing[part], self._next, group=group, tag=number))
        self._receives[piece] = dist.irecv(incoming[part], self._previous, group=group, tag=number)

    def wait(self) -> None:
        if self._full is None:
            return
        rank, world = self._comm.rank, self._comm.world_size
        try:
            for step in range(world - 1):
                last = step == world - 2
                for piece, part in enumerate(self._pieces):
                    self._comm.wait(self._receives[piece], self.what)
                    if self._reduce:
                        received = self._shard[part]
                        mine = self._chunk(reduce_scatter_chunks(rank, world, step)[1])[part]
                        if last:  # the chunk received last is this rank's own: the sum ends in the shard
                            torch.add(received, mine, out=self._shard[part])
                        else:
                            mine.add_(received)
                    if not last:
                        self._post(step + 1, piece)
            for send in self._sends:
                self._comm.wait(send, self.what)
            if not self._reduce and self._shard.data_ptr() != self._chunk(rank).data_ptr():
                self._chunk(rank).copy_(self._shard)
        finally:
            self._full = self._shard = None
            self._sends, self._receives = [], []
