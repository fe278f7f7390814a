"""One module per algorithm; this registry maps torch.optim classes and names to them."""

from __future__ import annotations

import torch

from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .asgd import ASGD
from .base import Algorithm, Group, Slices
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .sgd import SGD

ALGORITHMS: dict[type[torch.optim.Optimizer], Algorithm] = {
    algorithm.torch_class: algorithm
    for algorithm in (
        Adam(),
        AdamW(),
        Adamax(),
        NAdam(),
        RAdam(),
        Adagrad(),
        Adadelta(),
        RMSprop(),
        Rprop(),
        SGD(),
        ASGD(),
    )
}

# torch.optim algorithms that read whole tensors (row/column statistics, Newton-Schulz): not
# element-wise, so shardopt.owned.OwnedOptimizer runs them, each tensor on one owner rank.
WHOLE_TENSOR: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adafactor, torch.optim.Muon)


def whole_tensor_class(optimizer_class: object) -> type[torch.optim.Optimizer] | None:
    """The torch.optim class if ``optimizer_class`` (a class or its case-insensitive name) is one of
    WHOLE_TENSOR, else None."""
    for cls in WHOLE_TENSOR:
        if optimizer_class is cls:
            return cls
        if isinstance(optimizer_class, str) and optimizer_class.lower() == cls.__name__.lower():
            return cls
    return None


def is_lbfgs(optimizer_class: object) -> bool:
    """Whether ``optimizer_class`` is torch.optim.LBFGS or its case-insensitive name: not element-wise
    (global dot products), so shardopt.lbfgs.ShardedLBFGS runs it."""
    return optimizer_class is torch.optim.LBFGS or (
        isinstance(optimizer_class, str) and optimizer_class.lower() == "lbfgs"
    )


def is_sparse_adam(optimizer_class: object) -> bool:
    """Whether ``optimizer_class`` is torch.optim.SparseAdam or its case-insensitive name: sharded by
    rows of its sparse gradients, so shardopt.sparse.SparseRowOptimizer runs it."""
    return optimizer_class is torch.optim.SparseAdam or (
        isinstance(optimizer_class, str) and optimizer_class.lower() == "sparseadam"
    )


def resolve(optimizer_class: type[torch.optim.Optimizer] | str) -> Algorithm:
    """The algorithm for a torch.optim class or its case-insensitive name ("adamw")."""
    supported = ", ".join(
        sorted(cls.__name__ for cls in (*ALGORITHMS, *WHOLE_TENSOR, torch.optim.LBFGS, torch.optim.SparseAdam))
    )
    if isinstance(optimizer_class, str):
        by_name = {cls.__name__.lower(): cls for cls in ALGORITHMS}
        name = optimizer_class.lower()
        if name in by_name:
            return ALGORITHMS[by_name[name]]
        raise ValueError(
            f"optimizer_class {optimizer_class!r} is not a torch.optim algorithm; choose one of: {supported}"
        )
    if isinstance(optimizer_class, type) and optimizer_class in ALGORITHMS:
        return ALGORITHMS[optimizer_class]
    name = getattr(optimizer_class, "__name__", repr(optimizer_class))
    raise TypeError(
        f"optimizer_class must be a torch.optim algorithm class or its name, got {name}; choose one of: {supported}"
    )


__all__ = [
    "ALGORITHMS",
    "WHOLE_TENSOR",
    "Algorithm",
    "Group",
    "Slices",
    "is_lbfgs",
    "is_sparse_adam",
    "resolve",
    "whole_tensor_class",
]
