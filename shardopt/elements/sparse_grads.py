"""Sparse gradients (``nn.Embedding(sparse=True)``) for the element-wise algorithms whose torch
versions take them: SGD and Adagrad.

Their sparse updates equal the dense ones with zero gradient in the rows the sparse gradient does
not name (Adagrad adds 0 to the sum and moves the row by 0; SGD's momentum buffer decays every
earlier row either way). So a sparse parameter stays in its flat buffer and the fused update runs
unchanged; only the gradient travels differently: the ranks exchange their coalesced (indices,
values), never a dense table, and each rank adds the entries that fall in its shard (a shard
boundary may cut a row) into its shard of the mean gradient. The dense reduction of a buffer
holding a parameter known to be sparse skips that parameter's span.

Pure functions, except :func:`reduce_ranges` (one collective per range).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..collectives import sparse_exchange
from ..collectives.comm import Comm, Pending
from ..collectives.span import Span
from ..shared.rows import entries_in
from .buffer import ShardedBuffer
from .layout import BufferLayout, Slot

# torch.optim's own words where a keyword rules out sparse gradients (torch/optim/sgd.py and adagrad.py:
# weight decay adds the dense parameter to the sparse gradient; the fused kernels take dense tensors).
SGD_FUSED_ERROR = "`_fused_sgd` does not support sparse gradients"
SGD_WEIGHT_DECAY_ERROR = "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
ADAGRAD_FUSED_ERROR = "`fused` does not support sparse grad or complex param"
ADAGRAD_WEIGHT_DECAY_ERROR = "weight_decay option is not compatible with sparse gradients"


def refusal(torch_class: type[torch.optim.Optimizer], group: Mapping[str, Any], where: str) -> str | None:
    """Why ``torch_class`` with ``group``'s keywords cannot take a sparse gradient for ``where``
    (torch's own message where torch raises too), or None where it can."""
    if torch_class is torch.optim.SGD:
        if group["fused"]:
            return SGD_FUSED_ERROR
        return SGD_WEIGHT_DECAY_ERROR if group["weight_decay"] != 0 else None
    if torch_class is torch.optim.Adagrad:
        if group["fused"]:
            return ADAGRAD_FUSED_ERROR
        if group["weight_decay"] != 0:
            return ADAGRAD_WEIGHT_DECAY_ERROR
        if group["eps"] == 0 and group["initial_accumulator_value"] == 0:
            # The dense update divides the untouched rows' 0 by sqrt(0) + 0; torch's sparse one skips them.
            return (
                f"{where} has a sparse gradient, which shardopt's Adagrad takes only with eps > 0 or "
                "initial_accumulator_value > 0 (rows the gradient does not touch would become 0/0 = NaN); "
                "set one of them above 0"
            )
        return None
    return f"{where} has a sparse gradient; {torch_class.__name__} takes dense gradients"


def dense_ranges(slots: tuple[Slot, ...], sparse: set[int], numel: int) -> list[Span]:
    """The contiguous ranges of a buffer of ``numel`` elements that hold no slot of ``sparse``: what
    its dense reduction covers (alignment gaps go along, as they do not cost a collective)."""
    ranges, start = [], 0
    for position, slot in enumerate(slots):
        if position in sparse:
            if slot.span.start > start:
                ranges.append(Span(start, slot.span.start))
            start = slot.span.end
    if numel > start:
        ranges.append(Span(start, numel))
    return ranges


def reduce_ranges(
    comm: Comm, tensor: Tensor, ranges: list[Span], what: str, then: Callable[[], Any] | None = None
) -> Pending:
    """Collective. Before: every rank holds ``tensor``. After the returned wait: each of ``ranges`` of
    it is summed over the ranks (in place), the rest is as it was, and ``then`` has run."""
    pendings = [comm.all_reduce_(tensor[span.slice], what) for span in ranges]

    def finish() -> None:
        for pending in pendings:
            pending.wait()
        if then is not None:
            then()

    return Pending(comm, None, what, finish)


def add_entries(window: Tensor, in_param: Span, shape: tuple[int, ...], indices: Tensor, values: Tensor) -> None:
    """Add the entries of a sparse gradient of a parameter of ``shape`` (``indices``: sparse_dim x nnz,
    duplicates allowed; ``values``: nnz x the dense dims) that fall in the elements ``in_param`` of
    the flattened parameter into ``window``, which holds those elements."""
    sparse_dim = indices.shape[0]
    block = math.prod(shape[sparse_dim:])  # the elements one entry covers, contiguous
    if not indices.shape[1] or not block or not in_param.size:
        return
    # An entry's position among the parameter's blocks (row-major over the sparse dims).
    strides = torch.tensor([math.prod(shape[d + 1 : sparse_dim]) for d in range(sparse_dim)], device=indices.device)
    blocks = (indices * strides.view(-1, 1)).sum(0)
    first, last = in_param.start // block, -(-in_param.end // block)  # the blocks the window cuts
    mine, mine_values = entries_in(blocks.view(1, -1), values.reshape(-1, block), range(first, last))
    offsets = (mine[0] * block + first * block - in_param.start).view(-1, 1) + torch.arange(block, device=mine.device)
    inside = (offsets >= 0) & (offsets < in_param.size)
    window.index_add_(0, offsets[inside], mine_values[inside].to(window.dtype))


class KnownSparse:
    """Per buffer, the parameters agreed sparse in some step (the same on every rank) and, where there
    are any, the ranges its dense reduction covers instead of the whole buffer (None: all of it)."""

    def __init__(self) -> None:
        self._slots: list[set[int]] = []
        self.ranges: list[list[Span] | None] = []

    def add_buffer(self) -> None:
        self._slots.append(set())
        self.ranges.append(None)

    def flags(self, sizes: list[int]) -> Tensor | None:
        """Per parameter, in the buffers' order (``sizes``: parameters per buffer): whether it had a sparse
        gradient in an earlier step; None while none had (the common case, looked up once per buffer)."""
        if not any(self._slots):
            return None
        return torch.tensor([slot in known for size, known in zip(sizes, self._slots) for slot in range(size)])

    def mark(self, index: int, slot: int, layout: BufferLayout) -> None:
        """Parameter ``slot`` of buffer ``index`` (laid out as ``layout``) had a sparse gradient."""
        if slot not in self._slots[index]:
            self._slots[index].add(slot)
            self.ranges[index] = dense_ranges(layout.slots, self._slots[index], layout.numel)


def add_reduced(
    comm: Comm,
    local: Mapping[Tensor, Tensor | None],
    places: Mapping[Tensor, tuple[int, int]],
    buffers: Sequence[ShardedBuffer],
    shards: Sequence[Tensor],
    reduce: bool,
    mean: bool,
) -> None:
    """Collective: add the reduction (mean or sum, or this rank's own where ``reduce`` is False) of the
    ranks' sparse gradients ``local`` (coalesced, None where this rank has none) into ``shards``, this
    rank's shard of each buffer's reduced gradient; ``places`` holds each parameter's (buffer, slot)."""
    world = comm.world_size
    if reduce and world > 1:
        everyone = sparse_exchange.gather_gradients(comm, dict(local))
    else:  # nothing to reduce: this rank's own gradient is the result
        everyone = {p: (g.indices(), g.values()) for p, g in local.items() if g is not None}
    for param, (indices, values) in everyone.items():
        index, slot = places[param]
        buffer = buffers[index]
        values = values.to(buffer.grad_dtype)
        if mean and world > 1:  # before summing duplicates, as (g_0 + ... + g_N-1) / N adds g_r / N
            values = values / world
        for piece in buffer.pieces:
            if piece.slot == slot:
                add_entries(shards[index][piece.in_shard.slice], piece.in_param, tuple(param.shape), indices, values)


def densified(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A torch.optim state entry with its sparse tensors made dense (torch's SGD keeps a sparse
    momentum buffer for a parameter trained on sparse gradients; the shards are dense)."""
    return {name: v.to_dense() if isinstance(v, Tensor) and v.is_sparse else v for name, v in entry.items()}
