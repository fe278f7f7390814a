"""shardopt: torch.optim algorithms with their state sharded ZeRO-style across data-parallel ranks."""

from __future__ import annotations

from typing import Any

from . import checkpoint
from .algorithms import ALGORITHMS
from .amp import GradScaler
from .averaging import ShardedAveragedModel
from .optimizer import ShardedOptimizer

__version__ = "0.1.0"


def _alias(torch_class: type) -> type[ShardedOptimizer]:
    """``shardopt.AdamW(params, lr=...)`` is ``ShardedOptimizer(params, torch.optim.AdamW, lr=...)``."""

    def __init__(self: ShardedOptimizer, params: Any, **kwargs: Any) -> None:
        ShardedOptimizer.__init__(self, params, torch_class, **kwargs)

    return type(
        torch_class.__name__,
        (ShardedOptimizer,),
        {
            "__init__": __init__,
            "__doc__": f"``torch.optim.{torch_class.__name__}`` sharded: see :class:`ShardedOptimizer`.",
            "__module__": __name__,
        },
    )


_ALIASES = {cls.__name__: _alias(cls) for cls in ALGORITHMS}
globals().update(_ALIASES)

__all__ = ["GradScaler", "ShardedAveragedModel", "ShardedOptimizer", "checkpoint", *sorted(_ALIASES)]
