"""Where a training framework needs more than swapping the optimizer line: one module per framework,
each over the framework's own hooks, importing it only when used (the framework is an optional extra)."""

from __future__ import annotations

import torch

from ..shared.reduced_grads import ReducedGradients, owner
from ..slices.optimizer import ShardedLBFGS


def sharded(optimizer: object) -> torch.optim.Optimizer | None:
    """The shardopt optimizer inside the wrappers frameworks put around it (Accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), or None if there is none."""
    inner = owner(optimizer)
    return inner if isinstance(inner, (ReducedGradients, ShardedLBFGS)) else None
