"""One buffer's gradient between two steps (``Window``), and each reduction issued of it (``Round``):
what the reducer knows of a buffer as backward fills it and its collectives complete."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..collectives.pending import Pending
from .buffer import DENSE, NO_GRAD, ShardedBuffer


@dataclass
class Round:
    """One issued reduction of a buffer's gradient."""

    buffer: ShardedBuffer
    pending: Pending | None  # None: nothing to wait for (no reduction, or a world of one)
    staging: Tensor | None  # handed back to the pool once the collective is done
    into: Tensor  # where the result lands
    accumulate: bool  # add ``into`` to the gradient shard once done (a second round)
    done: bool = False
    # Stage 2: parameters whose gradient was dropped (model.zero_grad()) after this round was issued and
    # before the next: their pieces of the gradient shard are zeroed once it is done.
    dropped: list[int] = field(default_factory=list)


@dataclass
class Window:
    """One buffer's gradient between two steps."""

    size: int
    arrived: list[bool] = field(init=False)
    arrived_count: int = 0
    codes: list[int] = field(init=False)  # per parameter, the kinds absorbed: NO_GRAD, or DENSE | SPARSE bits
    staging: Tensor | None = None  # being filled, not launched yet
    # Where the reduce-scatter reads the gradients where they lie: per parameter, its flat gradient
    # (None until it has one); None where gradients are copied into ``staging``.
    held: list[Tensor | None] | None = None
    views: list[Tensor] = field(default_factory=list)  # of ``staging``, one per parameter
    sparse_grads: dict[int, Tensor] = field(default_factory=dict)  # stage 2: per slot, kept aside whole
    followed: bool = False  # the buffer has looked for a new dtype or device of its parameters
    launched: bool = False
    late: bool = False
    rounds: list[Round] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.arrived = [False] * self.size
        self.codes = [NO_GRAD] * self.size

    @property
    def complete(self) -> bool:
        return self.arrived_count == self.size


def codes_tensor(codes: list[int]) -> Tensor:
    """``codes`` as a tensor; every parameter dense is the common case, and testing for it runs at C speed."""
    if codes.count(DENSE) == len(codes):
        return torch.full((len(codes),), DENSE, dtype=torch.int64)
    return torch.tensor(codes, dtype=torch.int64)
