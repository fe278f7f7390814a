"""The contract between the coordinator and one algorithm's math.

An algorithm module says *what* an update is, on flat shard tensors; the coordinator
decides which slices of a shard to hand it. Every slice it hands over holds only
parameters that have a gradient this step and share the same per-parameter scalar
state (step count, ...), so updating the slice with one pass of tensor ops equals
torch.optim's single-tensor implementation applied to each of those parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

Group = dict[str, Any]


class Algorithm(ABC):
    """The math of one element-wise ``torch.optim`` algorithm."""

    #: The torch.optim class whose behaviour this reproduces.
    torch_class: ClassVar[type[torch.optim.Optimizer]]
    #: True where torch creates the state at construction rather than at a
    #: parameter's first step (Adagrad): every parameter then has state from the start.
    eager_state: ClassVar[bool] = False

    def scalar_state(self, group: Group) -> dict[str, float]:
        """Per-parameter 0-d state and its initial value, in torch.optim's key order.

        torch keeps these as 0-d tensors per parameter (``state["step"]``); the
        coordinator keeps one value per parameter on every rank.
        """
        return {"step": 0.0}

    @abstractmethod
    def tensor_state(self, group: Group) -> tuple[str, ...]:
        """Names of the element-wise state this group's keywords need, in torch.optim's key order."""

    def initial_value(self, name: str, group: Group) -> float | Tensor:
        """Value every element of state ``name`` starts at (zeros unless torch says otherwise)."""
        return 0.0

    @abstractmethod
    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        scalars: dict[str, Tensor],
        group: Group,
        fresh: bool,
    ) -> None:
        """Update ``param`` and ``state`` in place from ``grad``; never write to ``grad``.

        ``scalars`` holds one 0-d tensor per name of :meth:`scalar_state`, shared by
        every parameter of the slice; update them in place as torch does (``step += 1``).
        ``fresh`` is True on the step that created the slice's state.
        """


def apply_weight_decay(param: Tensor, grad: Tensor, group: Group, lr: float | Tensor) -> Tensor:
    """torch's weight decay: an L2 term added to the gradient, or (``decoupled_weight_decay``)
    the parameter shrunk in place before the update. Returns the gradient to use."""
    weight_decay = group["weight_decay"]
    if weight_decay == 0:
        return grad
    if group.get("decoupled_weight_decay"):
        param.mul_(1 - lr * weight_decay)
        return grad
    return grad.add(param, alpha=weight_decay)
