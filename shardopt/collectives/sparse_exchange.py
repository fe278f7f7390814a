"""The collectives of SparseAdam's row sharding: sparse gradients and updated rows, never a dense table.

Each function is collective: every rank calls it with the same parameter, in the same order.
A sparse gradient of a (V, D) table with nnz entries is sparse_dim x nnz indices and nnz x D
values; these functions move only those, and the rows an update wrote, so the bytes on the wire
follow the batch's rows, not V.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .comm import Comm


def gather_counts(comm: Comm, counts: list[int]) -> Tensor:
    """Before: each rank's ``counts`` (one number per parameter, the same length on every rank).
    After: returns every rank's, as a world_size x len(counts) int64 tensor on the CPU."""
    mine = torch.tensor(counts, dtype=torch.int64, device=comm.device)
    full = torch.empty(comm.world_size * len(counts), dtype=torch.int64, device=comm.device)
    comm.all_gather(full, mine, "the all-gather of the sparse gradients' entry counts").wait()
    return full.view(comm.world_size, len(counts)).cpu()


def gather_entries(
    comm: Comm, indices: Tensor, values: Tensor, nnz: list[int], dense_shape: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """Before: rank r holds its coalesced gradient's ``indices`` (sparse_dim x nnz[r]) and ``values``
    (nnz[r] x dense_shape). After: every rank holds all ranks' entries, concatenated in rank order
    (not coalesced: a row two ranks touched appears twice).

    Two all-gathers (indices, values) of equal parts, each rank's padded to the largest nnz: the
    bytes are N x max(nnz) entries, against N x V rows for an all-reduce of the densified table.
    """
    most, sparse_dim = max(nnz), indices.shape[0]
    padded_indices = indices.new_zeros(sparse_dim, most)
    padded_indices[:, : indices.shape[1]] = indices
    padded_values = values.new_zeros(most, *dense_shape)
    padded_values[: values.shape[0]] = values
    all_indices = indices.new_empty(comm.world_size, sparse_dim, most)
    all_values = values.new_empty(comm.world_size, most, *dense_shape)
    comm.all_gather(all_indices.view(-1), padded_indices.view(-1), "the all-gather of sparse gradient indices").wait()
    comm.all_gather(all_values.view(-1), padded_values.view(-1), "the all-gather of sparse gradient values").wait()
    return (
        torch.cat([all_indices[r, :, :n] for r, n in enumerate(nnz)], dim=1),
        torch.cat([all_values[r, :n] for r, n in enumerate(nnz)]),
    )


def gather_rows(comm: Comm, param: Tensor, rows: list[Tensor]) -> None:
    """Before: rank r has updated the rows ``rows[r]`` of ``param`` (every rank knows them all).
    After: every rank's ``param`` holds every rank's updated rows.

    One all-gather of only the touched rows, each rank's part padded to the most any rank
    touched: the rows no one updated are equal everywhere already and stay off the wire.
    """
    most = max(len(touched) for touched in rows)
    if most == 0:
        return
    part = param.new_zeros(most, *param.shape[1:])
    part[: len(rows[comm.rank])] = param[rows[comm.rank]]
    full = param.new_empty(comm.world_size, most, *param.shape[1:])
    comm.all_gather(full.view(-1), part.view(-1), "the all-gather of the updated rows").wait()
    for rank, touched in enumerate(rows):
        if rank != comm.rank and len(touched):
            param.index_copy_(0, touched, full[rank, : len(touched)])


def gather_row_shards(comm: Comm, shards: list[Tensor], ranges: list[range]) -> list[Tensor]:
    """Before: rank r holds, for each full tensor, its rows ``ranges[r]`` (``shards``, all of one
    dtype and row shape). After: returns the full tensors on every rank.

    One all-gather for all of them, each rank's part padded to the longest range (at most one row
    longer than the shortest).
    """
    most = max(len(rows) for rows in ranges)
    row_shape = shards[0].shape[1:]
    part = shards[0].new_zeros(len(shards), most, *row_shape)
    for position, shard in enumerate(shards):
        part[position, : shard.shape[0]] = shard
    full = shards[0].new_empty(comm.world_size, len(shards), most, *row_shape)
    comm.all_gather(full.view(-1), part.view(-1), "the all-gather of optimizer state rows").wait()
    return [
        torch.cat([full[r, position, : len(rows)] for r, rows in enumerate(ranges)]) for position in range(len(shards))
    ]


def gather_gradients(comm: Comm, local: dict[Tensor, Tensor | None]) -> dict[Tensor, tuple[Tensor, Tensor]]:
    """Before: each rank holds its coalesced sparse gradient (or None) of every parameter of ``local``
    (the same parameters, in the same order, on every rank). After: returns, for each parameter some
    rank has entries for, every rank's indices and values (:func:`gather_entries`).

    One all-gather of the counts (entries and sparse dims of every parameter), then two all-gathers
    per parameter some rank has entries for: its indices and its values.
    """
    counts = [g._nnz() if g is not None else 0 for g in local.values()]
    dims = [g.sparse_dim() if g is not None else 0 for g in local.values()]
    gathered = gather_counts(comm, counts + dims)
    n = len(local)
    everyone = {}
    for position, (param, grad) in enumerate(local.items()):
        nnz = gathered[:, position].tolist()
        sparse_dims = {d for d, k in zip(gathered[:, n + position].tolist(), nnz) if k}
        if not sparse_dims:
            continue
        if len(sparse_dims) > 1:
            raise RuntimeError(
                f"the ranks' sparse gradients of a parameter of shape {tuple(param.shape)} have different "
                f"sparse dims {sorted(sparse_dims)}; produce them alike on every rank"
            )
        sparse_dim = sparse_dims.pop()
        if grad is None or grad._nnz() == 0:  # this rank contributes nothing: empty parts of the right shape
            indices = torch.zeros(sparse_dim, 0, dtype=torch.int64, device=param.device)
            values = param.new_zeros(0, *param.shape[sparse_dim:])
        else:
            indices, values = grad.indices(), grad.values()
        everyone[param] = gather_entries(comm, indices, values, nnz, tuple(param.shape[sparse_dim:]))
    return everyone
