"""Pure arithmetic: which rank owns each whole tensor of an algorithm that needs whole tensors.

Adafactor's row/column statistics and Muon's Newton-Schulz iteration read a whole tensor, so
those algorithms are sharded by tensors: each parameter has one owner rank that keeps its state
and runs its update. The owners are chosen to balance the update work, with no communication:
every rank computes the same answer from the shapes alone.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence


def update_cost(algorithm: str, shape: Sequence[int]) -> int:
    """The relative work of one update of a parameter of ``shape`` by ``algorithm`` (a torch.optim class name).

    Muon: Newton-Schulz multiplies the (m, n) matrix by its Gram matrix a few times, about
    m * n * min(m, n) multiply-adds; the rest of its update (and all of Adafactor's) is
    element-wise, so it costs the number of elements.
    """
    numel = math.prod(shape)
    if algorithm == "Muon" and len(shape) == 2:
        return numel * min(shape)
    return numel


def assign_owners(costs: Sequence[int], world_size: int, loads: Sequence[int] | None = None) -> list[int]:
    """The owner rank of each item: greedy, largest cost first, each to the least loaded rank.

    ``loads`` are the ranks' costs so far (items assigned earlier, e.g. an earlier param group);
    they are not changed. Ties go to the lower rank and the earlier item, so the answer depends on
    the arguments only. The most loaded rank exceeds the least loaded one by at most the largest
    cost (it was the least loaded when it took its last item), unless ``loads`` already differ more.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    start = list(loads) if loads is not None else [0] * world_size
    if len(start) != world_size:
        raise ValueError(f"loads has {len(start)} entries for {world_size} ranks")
    heap = [(load, rank) for rank, load in enumerate(start)]
    heapq.heapify(heap)
    owners = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        owners[item] = rank
        heapq.heappush(heap, (load + costs[item], rank))
    return owners
