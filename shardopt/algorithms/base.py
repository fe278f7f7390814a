"""The contract between the coordinator and one algorithm's math.

An algorithm module says *what* an update is, on flat shard tensors; the coordinator
decides which slices of a shard to hand it. Every slice it hands over holds only
parameters that have a gradient this step and share the same per-parameter scalar
state (step count, ...), so updating the slice with one pass of tensor ops equals
torch.optim's single-tensor implementation applied to each of those parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

Group = dict[str, Any]
Coefficients = dict[str, float | Tensor | bool]


@dataclass(frozen=True)
class Slices:
    """Slices of shards that one kernel call updates together: parameters, their gradients and
    their element-wise state, on one device, of one dtype, sharing their scalar state."""

    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Tensor]]

    def state(self, name: str) -> list[Tensor]:
        """State ``name`` of every slice."""
        return [state[name] for state in self.states]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, dict[str, Tensor]]]:
        return zip(self.params, self.grads, self.states, strict=True)


class Algorithm(ABC):
    """The math of one element-wise ``torch.optim`` algorithm, in two parts.

    :meth:`coefficients` does the per-parameter scalar work (advancing the step, bias
    corrections, ...) and :meth:`elementwise` the tensor work. Keeping them apart lets
    ``shardopt.elements.kernels`` run the tensor part as one compiled kernel, with the scalars
    as inputs: a changing learning rate or step never recompiles it.
    """

    #: The torch.optim class whose behaviour this reproduces.
    torch_class: ClassVar[type[torch.optim.Optimizer]]
    #: True where torch creates the state at construction rather than at a
    #: parameter's first step (Adagrad): every parameter then has state from the start.
    eager_state: ClassVar[bool] = False
    #: The bool keywords of a group that :meth:`elementwise` reads. Compiling makes one
    #: graph per combination of their values, and they are all it may read from the group.
    flags: ClassVar[tuple[str, ...]] = ("maximize",)
    #: torch's own fused kernel for this algorithm, where it has one: a method taking
    #: (slices, scalars, group, fresh), called after :meth:`coefficients` has advanced
    #: ``scalars``, as torch increments ``step`` before its fused kernels.
    native_fused: ClassVar[Callable[..., None] | None] = None

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
    def coefficients(self, scalars: dict[str, Tensor], group: Group, fresh: bool) -> Coefficients:
        """Advance ``scalars`` in place as torch does (``step += 1``) and return the scalar
        inputs of :meth:`elementwise`.

        ``scalars`` holds one 0-d tensor per name of :meth:`scalar_state`, shared by
        every parameter of the slice; ``fresh`` is True on the step that created the
        slice's state. All scalar arithmetic happens here, so that every value reaches
        its tensor op rounded exactly as in torch. A bool entry is a branch of
        :meth:`elementwise` (one compiled graph per value); every other entry is a
        float or a 0-d tensor (from a tensor ``lr``).
        """

    @abstractmethod
    def elementwise(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Coefficients, group: Group
    ) -> None:
        """Update ``param`` and ``state`` in place from ``grad``; never write to ``grad``.

        Tensor ops only: no ``.item()`` and no branch on a tensor's value. Each float
        entry of ``coefficients`` may arrive as a 0-d tensor instead (when compiled), and
        ``group`` holds only the keywords named in :attr:`flags`.
        """

    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        scalars: dict[str, Tensor],
        group: Group,
        fresh: bool,
    ) -> None:
        """One eager step of the slice: :meth:`coefficients`, then :meth:`elementwise`."""
        self.elementwise(param, grad, state, self.coefficients(scalars, group, fresh), group)


def weight_decay_coefficients(group: Group, lr: float | Tensor) -> Coefficients:
    """The coefficients :func:`apply_weight_decay` reads: whether there is weight decay,
    and ``decay``, the factor of the L2 term or (decoupled) the parameter's scale."""
    weight_decay = group["weight_decay"]
    if group.get("decoupled_weight_decay"):
        return {"weight_decay": weight_decay != 0, "decay": 1 - lr * weight_decay}
    return {"weight_decay": weight_decay != 0, "decay": weight_decay}


def apply_weight_decay(param: Tensor, grad: Tensor, coefficients: Coefficients, group: Group) -> Tensor:
    """torch's weight decay: an L2 term added to the gradient, or (``decoupled_weight_decay``)
    the parameter shrunk in place before the update. Returns the gradient to use."""
    if not coefficients["weight_decay"]:
        return grad
    if group.get("decoupled_weight_decay"):
        param.mul_(coefficients["decay"])
        return grad
    return grad.add(param, alpha=coefficients["decay"])


def native_step(scalars: dict[str, Tensor], slices: Slices) -> list[Tensor]:
    """The ``state_steps`` argument of torch's fused kernels: float32, on the slices' device,
    one per slice (they share it: the kernels only read it)."""
    step = scalars["step"].to(device=slices.params[0].device, dtype=torch.float32)
    return [step] * len(slices.params)


def native_lr(group: Group, param: Tensor) -> float | Tensor:
    """The ``lr`` argument of torch's fused kernels: a tensor ``lr`` only where it is on the
    parameter's device (the kernels' own requirement), else its value."""
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.device != param.device:
        return lr.item()
    return lr


def adam_moments(param: Tensor, grad: Tensor, state: dict[str, Tensor], c: Coefficients, group: Group) -> Tensor:
    """The opening Adam, NAdam and RAdam share: direction (``maximize``), weight decay, and both
    moment averages updated in place. Returns the gradient the rest of the update uses."""
    if group["maximize"]:
        grad = -grad
    grad = apply_weight_decay(param, grad, c, group)
    state["exp_avg"].lerp_(grad, c["one_minus_beta1"])
    state["exp_avg_sq"].mul_(c["beta2"]).addcmul_(grad, grad, value=c["one_minus_beta2"])
    return grad
