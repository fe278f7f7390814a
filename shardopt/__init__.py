"""shardopt: torch.optim algorithms with their state sharded ZeRO-style across data-parallel ranks."""

from __future__ import annotations

from typing import Any

import torch

from . import checkpoint
from .algorithms import EVERY
from .amp import GradScaler
from .averaging import ShardedAveragedModel
from .collectives.fingerprint import DesyncError
from .elements.optimizer import ElementOptimizer
from .owner.optimizer import OwnedOptimizer
from .rows.optimizer import SparseRowOptimizer
from .shared.base import ShardedOptimizer
from .shared.reduced_grads import clip_grad_norm_
from .slices.optimizer import ShardedLBFGS

__version__ = "0.1.0"


def _alias(torch_class: type[torch.optim.Optimizer]) -> type[ShardedOptimizer]:
    """``shardopt.AdamW(params, lr=...)`` is ``ShardedOptimizer(params, torch.optim.AdamW, lr=...)``: a
    subclass of the scheme that shards the algorithm (LBFGS's is ShardedLBFGS itself, which takes
    torch's LBFGS keywords alone)."""
    if torch_class is torch.optim.LBFGS:
        return ShardedLBFGS
    base = ShardedOptimizer._schemes[torch_class]

    def __init__(self: Any, params: Any, **kwargs: Any) -> None:
        base.__init__(self, params, torch_class, **kwargs)

    return type(
        torch_class.__name__,
        (base,),
        {
            "__init__": __init__,
            "__doc__": f"``torch.optim.{torch_class.__name__}`` sharded: see :class:`{base.__name__}`.",
            "__module__": __name__,
        },
    )


_ALIASES = {cls.__name__: _alias(cls) for cls in EVERY}
globals().update(_ALIASES)

__all__ = [
    "DesyncError",
    "ElementOptimizer",
    "GradScaler",
    "OwnedOptimizer",
    "ShardedAveragedModel",
    "ShardedLBFGS",
    "ShardedOptimizer",
    "SparseRowOptimizer",
    "checkpoint",
    "clip_grad_norm_",
    *sorted(_ALIASES),
]
