"""The collectives of the whole-tensor (owner) scheme, on tensors packed into one flat buffer per dtype.

Each function is collective, and every rank passes tensors of the same shapes and dtypes in the
same order; packing them per dtype makes one collective of each kind per dtype, not one per tensor.
The flat buffers live on the process group's device (NCCL: this rank's GPU), whatever device
the tensors are on (Adafactor's ``step`` is a CPU tensor even for CUDA parameters).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .comm import Comm


def _by_dtype(tensors: list[Tensor]) -> dict[torch.dtype, list[int]]:
    """The positions of ``tensors``, grouped by dtype, in order."""
    groups: dict[torch.dtype, list[int]] = {}
    for position, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(position)
    return groups


def _pack(tensors: list[Tensor], comm: Comm, numel: int) -> Tensor:
    """``tensors`` (of one dtype) concatenated and zero-padded to ``numel`` elements, on ``comm``'s device."""
    flat = torch.zeros(numel, dtype=tensors[0].dtype, device=comm.device)
    offset = 0
    for tensor in tensors:
        flat[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
        offset += tensor.numel()
    return flat


def _views(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Consecutive pieces of ``flat`` with the shapes of ``like``."""
    views, offset = [], 0
    for tensor in like:
        views.append(flat[offset : offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()
    return views


def broadcast_from_first(comm: Comm, tensors: list[Tensor], what: str) -> None:
    """Before: any values. After: every rank's ``tensors`` hold rank 0's values."""
    if comm.world_size == 1:
        return
    for positions in _by_dtype(tensors).values():
        group = [tensors[p] for p in positions]
        flat = _pack(group, comm, sum(t.numel() for t in group))
        comm.broadcast_(flat, what).wait()
        for tensor, value in zip(group, _views(flat, group)):
            tensor.copy_(value)


def all_reduce(comm: Comm, tensors: list[Tensor], what: str, divide: bool) -> list[Tensor]:
    """Before: each rank's ``tensors``. After: returns their sum over the ranks (divided by the world
    size with ``divide``), in the same order and shapes, as views of one flat buffer per dtype."""
    if comm.world_size == 1:
        return list(tensors)
    reduced: list[Tensor] = list(tensors)
    for positions in _by_dtype(tensors).values():
        group = [tensors[p] for p in positions]
        flat = _pack(group, comm, sum(t.numel() for t in group))
        comm.all_reduce_(flat, what).wait()
        if divide:
            flat.div_(comm.world_size)
        for position, view in zip(positions, _views(flat, group)):
            reduced[position] = view
    return reduced


def gather_from_owners(comm: Comm, tensors: list[Tensor], owners: list[int], what: str) -> None:
    """Before: ``tensors[i]`` holds its value on rank ``owners[i]``. After: on every rank.

    One all-gather per dtype: each rank contributes its owned tensors packed, padded to the
    largest rank's part (the all-gather takes equal parts). Broadcasts from each owner would
    send no padding but take N collectives instead of one. The owners balance the work, which
    for Adafactor is the bytes and for Muon grows with them, so the parts stay close in size and
    the padding costs less than N - 1 more collective latencies (and gloo runs a large
    all-gather as one all-reduce, see comm.py).
    """
    if comm.world_size == 1:
        return
    for positions in _by_dtype(tensors).values():
        parts: list[list[Tensor]] = [[] for _ in range(comm.world_size)]
        for p in positions:
            parts[owners[p]].append(tensors[p])
        sizes = [sum(t.numel() for t in part) for part in parts]
        padded = max(sizes)
        if padded == 0:
            continue
        dtype = tensors[positions[0]].dtype
        mine = parts[comm.rank]
        shard = _pack(mine, comm, padded) if mine else torch.zeros(padded, dtype=dtype, device=comm.device)
        full = torch.empty(padded * comm.world_size, dtype=dtype, device=comm.device)
        comm.all_gather(full, shard, what).wait()
        for rank, part in enumerate(parts):
            if rank != comm.rank:
                for tensor, value in zip(part, _views(full[rank * padded :], part)):
                    tensor.copy_(value)
