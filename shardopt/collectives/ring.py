"""Reduce-scatter and all-gather as rings of point-to-point messages: how shardopt moves them on gloo.

gloo's own reduce-scatter and all-gather are slower than its all-reduce, and its all-reduce
moves twice the bytes a reduce-scatter must; these rings are faster than all three
(benchmarks/results/design_measurements.md). A ring of N ranks takes N-1 steps: at each, rank r sends one chunk to rank
r+1 and receives one from rank r-1, so every rank sends (N-1)/N of the buffer, what NCCL's
ring sends. Each chunk travels in pieces of at most about :data:`PIECE_BYTES`, so that adding one
piece overlaps receiving the next. With 2 ranks the one step is in flight as soon as it is issued;
with more, :meth:`Ring.wait` drives the later steps (each needs the chunk the step before
received), so every rank must wait its rings in the order it issued them, as it does.

Between two ranks a reduce-scatter's own data is only read (the one step sends the other
rank's chunk and adds the received one to this rank's), so :class:`PairReduceScatter` reads it
where it lies, as separate tensors (the parameters' gradients, as autograd left them): the
gradients are not first copied into one flat buffer, a pass over every gradient each step.
Its messages follow the tensors' spans, the same on both ranks
whatever each holds (:func:`held_plan`).

The chunk and message arithmetic is pure (:func:`reduce_scatter_chunks`, :func:`all_gather_chunks`,
:func:`pieces`, :func:`held_plan`) and tested without processes.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .pending import Link, Pending
from .span import Span

#: Bytes per message. Pieces let the add of one overlap receiving the next where one large buffer is
#: in flight alone; with many buffers in flight each message's own cost dominates, so pieces are
#: large (benchmarks/results/design_measurements.md).
PIECE_BYTES = 8 << 20
# Tags of ring messages: bit 30 set, clear of the small tags users give their own send/recv; the low 30
# bits count the messages of a process group, in issue order, which is the same on every rank.
_TAG_BIT, _TAG_MASK = 1 << 30, (1 << 30) - 1
_messages: defaultdict[str, int] = defaultdict(int)


def reserve_tags(comm: Link, count: int) -> int:
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


@dataclass(frozen=True)
class Message:
    """One message of a :class:`PairReduceScatter`: ``size`` elements of part ``part`` from its element
    ``start``, landing at element ``at`` of the receiver's chunk."""

    part: int
    start: int
    at: int
    size: int


@dataclass(frozen=True)
class HeldPlan:
    """The messages of a reduce-scatter of a flat buffer of ``numel`` elements whose span ``spans[i]``
    is held tensor ``i`` (zeros elsewhere: gradients read where they lie), among ``len(messages)``
    ranks: per chunk, the messages that carry it and the ranges of it no held tensor covers."""

    messages: tuple[tuple[Message, ...], ...]
    uncovered: tuple[tuple[slice, ...], ...]


def held_plan(
    spans: Sequence[Span], numel: int, world_size: int, itemsize: int, piece_bytes: int = PIECE_BYTES
) -> HeldPlan:
    """The :class:`HeldPlan` of ``spans`` (in order, not overlapping) in a buffer of ``numel`` elements
    (a multiple of ``world_size``) of ``itemsize`` bytes, each message at most about ``piece_bytes``."""
    chunk = numel // world_size
    messages: list[tuple[Message, ...]] = []
    uncovered: list[tuple[slice, ...]] = []
    for index in range(world_size):
        window_start = covered = index * chunk
        window = Span(window_start, window_start + chunk)
        found, gaps = [], []
        for part, span in enumerate(spans):
            inside = span.intersect(window)
            if inside is None:
                continue
            if inside.start > covered:
                gaps.append(slice(covered - window_start, inside.start - window_start))
            for piece in pieces(inside.size, itemsize, piece_bytes):
                start, size = inside.start + piece.start, piece.stop - piece.start
                found.append(Message(part, start - span.start, start - window_start, size))
            covered = inside.end
        if covered < window.end:
            gaps.append(slice(covered - window_start, chunk))
        messages.append(tuple(found))
        uncovered.append(tuple(gaps))
    return HeldPlan(tuple(messages), tuple(uncovered))


class PairReduceScatter(Pending):
    """The reduce-scatter, between the two ranks of ``comm``'s group, of the buffer ``plan`` describes,
    each rank's part ``i`` of it in ``parts[i]`` (1-D, as long as the plan's span ``i``); ``wait()``
    leaves the sum of this rank's chunk in ``shard``. ``parts`` are read, never written."""

    def __init__(self, comm: Link, shard: Tensor, parts: Sequence[Tensor], plan: HeldPlan, what: str) -> None:
        super().__init__(comm, None, what)
        rank, group = comm.rank, comm.group
        peer = dist.get_global_rank(group, 1 - rank)
        self._shard, self._parts, self._plan = shard, parts, plan
        first = reserve_tags(comm, len(plan.messages[0]) + len(plan.messages[1]))
        numbers = (first, first + len(plan.messages[0]))  # the first tag of each chunk's messages
        self._sends = [
            dist.isend(_carried(parts, message), peer, group=group, tag=tag(numbers[1 - rank] + number))
            for number, message in enumerate(plan.messages[1 - rank])
        ]
        self._receives = [
            dist.irecv(_landing(shard, message), peer, group=group, tag=tag(numbers[rank] + number))
            for number, message in enumerate(plan.messages[rank])
        ]

    def wait(self) -> None:
        if self._shard is None:
            return
        shard, parts, rank = self._shard, self._parts, self._comm.rank
        try:
            for message, receive in zip(self._plan.messages[rank], self._receives):
                self._comm.wait(receive, self.what)
                _landing(shard, message).add_(_carried(parts, message))
            for gap in self._plan.uncovered[rank]:
                shard[gap].zero_()
            for send in self._sends:
                self._comm.wait(send, self.what)
        finally:
            self._shard = self._parts = None
            self._sends, self._receives = [], []


def _carried(parts: Sequence[Tensor], message: Message) -> Tensor:
    """What ``message`` carries, in the sender's parts."""
    return parts[message.part][message.start : message.start + message.size]


def _landing(shard: Tensor, message: Message) -> Tensor:
    """Where ``message`` lands in the receiver's shard."""
    return shard[message.at : message.at + message.size]


class Ring(Pending):
    """One reduce-scatter (``reduce=True``) or all-gather of ``full`` over ``comm``'s group, by chunks of
    ``shard.numel()``; ``wait()`` completes it. Reduce-scatter sums ``full`` in place on the way."""

    def __init__(self, comm: Link, full: Tensor, shard: Tensor, what: str, *, reduce: bool) -> None:
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
