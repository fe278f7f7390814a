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
# element-wise, so each tensor is updated whole, on one owner rank (shardopt.owner.optimizer).
WHOLE_TENSOR: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adafactor, torch.optim.Muon)

#: Every torch.optim algorithm shardopt shards: the element-wise ones, the whole-tensor ones,
#: SparseAdam (by rows of its sparse gradients) and LBFGS (global dot products: by history slices).
EVERY: tuple[type[torch.optim.Optimizer], ...] = (
    *ALGORITHMS,
    *WHOLE_TENSOR,
    torch.optim.SparseAdam,
    torch.optim.LBFGS,
)


def torch_class(optimizer_class: object) -> type[torch.optim.Optimizer]:
    """The torch.optim class of ``optimizer_class``: one of :data:`EVERY`, or its case-insensitive name."""
    supported = ", ".join(sorted(cls.__name__ for cls in EVERY))
    if isinstance(optimizer_class, str):
        by_name = {cls.__name__.lower(): cls for cls in EVERY}
        if optimizer_class.lower() in by_name:
            return by_name[optimizer_class.lower()]
        raise ValueError(
            f"optimizer_class {optimizer_class!r} is not a torch.optim algorithm; choose one of: {supported}"
        )
    if isinstance(optimizer_class, type) and optimizer_class in EVERY:
        return optimizer_class
    name = getattr(optimizer_class, "__name__", repr(optimizer_class))
    raise TypeError(
        f"optimizer_class must be a torch.optim algorithm class or its name, got {name}; choose one of: {supported}"
    )


__all__ = [
    "ALGORITHMS",
    "EVERY",
    "WHOLE_TENSOR",
    "Algorithm",
    "Group",
    "Slices",
    "torch_class",
]
