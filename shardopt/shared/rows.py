"""Pure arithmetic of the row sharding SparseAdam uses: which rows each rank owns, which gradient
entries fall in them, which rows an update touched. No communication here.

Rows are a parameter's dim 0: an ``nn.Embedding(sparse=True)`` gradient names its entries by row
(sparse_dim 1), so a contiguous range of rows is what lets a rank pick its entries out of any
sparse gradient with one comparison on the row index.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_ranges(num_rows: int, world_size: int) -> list[range]:
    """``num_rows`` rows cut into ``world_size`` contiguous ranges, one per rank, in rank order;
    the first ``num_rows % world_size`` ranges hold one row more (some are empty when there are
    fewer rows than ranks)."""
    base, extra = divmod(num_rows, world_size)
    starts = [r * base + min(r, extra) for r in range(world_size + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(world_size)]


def entries_in(indices: Tensor, values: Tensor, rows: range) -> tuple[Tensor, Tensor]:
    """The entries of a sparse gradient (``indices``: sparse_dim x nnz, ``values``: nnz x dense dims)
    whose row lies in ``rows``, with their row shifted so that ``rows.start`` is row 0."""
    keep = (indices[0] >= rows.start) & (indices[0] < rows.stop)
    mine = indices[:, keep]
    mine[0] -= rows.start
    return mine, values[keep]


def touched_rows(row_indices: Tensor, ranges: list[range]) -> list[Tensor]:
    """For each range, the sorted distinct rows of ``row_indices`` in it: the rows its owner's
    SparseAdam update writes (every entry of a sparse gradient is updated, zero or not)."""
    distinct = torch.unique(row_indices)  # sorted
    return [distinct[(distinct >= rows.start) & (distinct < rows.stop)] for rows in ranges]
