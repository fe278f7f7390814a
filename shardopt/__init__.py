"""shardopt: torch.optim algorithms with their state sharded ZeRO-style across data-parallel ranks."""

from __future__ import annotations

from typing import Any

import torch

from . import checkpoint
from .algorithms import ALGORITHMS, WHOLE_TENSOR
from .amp import GradScaler
from .averaging import ShardedAveragedModel
from .fingerprint import DesyncError
from .grad_checks import clip_grad_norm_
from .lbfgs import ShardedLBFGS
from .optimizer import ShardedOptimizer
from .owned import OwnedOptimizer
from .sparse import SparseRowOptimizer

__version__ = "0.1.0"


def _alias(torch_class: type, base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``shardopt.AdamW(params, lr=...)`` is ``ShardedOptimizer(params, torch.optim.AdamW, lr=...)``
    (``OwnedOptimizer`` for the algorithms that need whole tensors)."""

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


_ALIASES = {cls.__name__: _alias(cls, ShardedOptimizer) for cls in ALGORITHMS}
_ALIASES |= {cls.__name__: _alias(cls, OwnedOptimizer) for cls in WHOLE_TENSOR}
_ALIASES["LBFGS"] = ShardedLBFGS  # takes only LBFGS's keywords: no optimizer_class to pass
_ALIASES["SparseAdam"] = _alias(torch.optim.SparseAdam, SparseRowOptimizer)
globals().update(_ALIASES)

__all__ = [
    "DesyncError",
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
