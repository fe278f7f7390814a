"""Where every element lives: parameters -> flat buffers -> each rank's shard.

Pure arithmetic, no torch.distributed: a parameter group's parameters are packed,
in order, into flat buffers (one per device and dtype, capped in size); each buffer
is padded so that it splits into ``world_size`` equal contiguous shards, and rank r
owns shard r. A parameter may be cut by a shard boundary, so the pieces of a shard
carry three coordinates each: in the buffer, in the shard, in the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from ..collectives.span import Span


@dataclass(frozen=True)
class ParamSpec:
    """What the layout needs to know of one parameter."""

    index: int  # position in its parameter group
    shape: tuple[int, ...]
    itemsize: int  # bytes per element
    key: Hashable  # parameters with equal keys (device, dtype) may share a buffer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in its flat buffer."""

    index: int  # position in its parameter group
    shape: tuple[int, ...]
    span: Span  # its elements in the buffer


@dataclass(frozen=True)
class Piece:
    """The part of one parameter that falls in one rank's shard."""

    slot: int  # position of the parameter in ``BufferLayout.slots``
    in_buffer: Span
    in_shard: Span
    in_param: Span  # offsets into the flattened parameter


@dataclass(frozen=True)
class BufferLayout:
    """One flat buffer: its parameters, its padded length and its shards."""

    key: Hashable
    slots: tuple[Slot, ...]
    numel: int  # padded: a multiple of world_size
    world_size: int

    @property
    def shard_numel(self) -> int:
        return self.numel // self.world_size

    def shard(self, rank: int) -> Span:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return Span(rank * self.shard_numel, (rank + 1) * self.shard_numel)

    def gaps(self) -> tuple[Span, ...]:
        """The elements no parameter covers: alignment gaps between parameters and the end padding."""
        gaps, end = [], 0
        for slot in self.slots:
            if slot.span.start > end:
                gaps.append(Span(end, slot.span.start))
            end = slot.span.end
        if self.numel > end:
            gaps.append(Span(end, self.numel))
        return tuple(gaps)

    def pieces(self, rank: int) -> tuple[Piece, ...]:
        """The parameters (or parts of them) that rank ``rank`` owns, in buffer order."""
        shard = self.shard(rank)
        pieces = []
        for position, slot in enumerate(self.slots):
            overlap = slot.span.intersect(shard)
            if overlap is not None:
                pieces.append(
                    Piece(
                        slot=position,
                        in_buffer=overlap,
                        in_shard=overlap.shift(-shard.start),
                        in_param=overlap.shift(-slot.span.start),
                    )
                )
        return tuple(pieces)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_buffers(
    params: Sequence[ParamSpec],
    world_size: int,
    *,
    bucket_cap_bytes: int,
    align_bytes: int = 16,
) -> list[BufferLayout]:
    """Pack one parameter group's parameters into flat buffers.

    Parameters keep their order within each buffer. Each parameter starts at a
    multiple of ``align_bytes`` (the kernels that read a parameter as a view want
    aligned storage, as FSDP and Megatron align theirs); a buffer is closed when the
    next parameter would take it past ``bucket_cap_bytes`` (a parameter larger than
    the cap gets a buffer of its own), and padded so that every shard has the same
    length and starts aligned.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    open_buffers: dict[Hashable, list[Slot]] = {}
    ends: dict[Hashable, int] = {}
    itemsizes: dict[Hashable, int] = {}
    closed: list[tuple[Hashable, list[Slot], int]] = []

    for spec in params:
        align = max(1, align_bytes // spec.itemsize)
        slots = open_buffers.setdefault(spec.key, [])
        start = _round_up(ends.get(spec.key, 0), align)
        if slots and (start + spec.numel) * spec.itemsize > bucket_cap_bytes:
            closed.append((spec.key, slots, ends[spec.key]))
            slots = open_buffers[spec.key] = []
            start = 0
        slots.append(Slot(spec.index, spec.shape, Span(start, start + spec.numel)))
        ends[spec.key] = start + spec.numel
        itemsizes[spec.key] = spec.itemsize
    closed.extend((key, slots, ends[key]) for key, slots in open_buffers.items() if slots)

    layouts = []
    for key, slots, end in sorted(closed, key=lambda item: item[1][0].index):
        align = max(1, align_bytes // itemsizes[key])
        numel = _round_up(max(end, 1), world_size * align)
        layouts.append(BufferLayout(key, tuple(slots), numel, world_size))
    return layouts


def runs(pieces: Iterable[Piece], keys: Sequence[Hashable | None]) -> dict[Hashable, list[Span]]:
    """Group a shard's pieces into contiguous shard spans that share a key.

    ``keys[slot]`` says how the parameter in that slot is to be updated (None: not
    at all). Neighbouring pieces with the same key merge into one span, alignment
    gaps between them included (gap elements are zero and every update keeps them
    zero), so the common case of one key for the whole buffer is one span.
    """
    spans: dict[Hashable, list[Span]] = {}
    previous_key: Hashable | None = None
    for piece in pieces:
        key = keys[piece.slot]
        if key is None:
            previous_key = None
            continue
        group = spans.setdefault(key, [])
        if key == previous_key and group:
            group[-1] = Span(group[-1].start, piece.in_shard.end)
        else:
            group.append(piece.in_shard)
        previous_key = key
    return spans
