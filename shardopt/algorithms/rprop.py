"""Rprop: per-element step sizes adapted from the sign of successive gradients."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Group


class Rprop(Algorithm):
    torch_class = torch.optim.Rprop

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("prev", "step_size")

    def initial_value(self, name: str, group: Group) -> float | Tensor:
        return _to_scalar(group["lr"]) if name == "step_size" else 0.0

    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        scalars: dict[str, Tensor],
        group: Group,
        fresh: bool,
    ) -> None:
        etaminus, etaplus = group["etas"]
        step_size_min, step_size_max = group["step_sizes"]
        prev, step_size = state["prev"], state["step_size"]
        if group["maximize"]:
            grad = -grad

        scalars["step"] += 1
        sign = grad.mul(prev).sign()
        sign[sign.gt(0)] = etaplus
        sign[sign.lt(0)] = etaminus
        sign[sign.eq(0)] = 1

        step_size.mul_(sign).clamp_(step_size_min, step_size_max)

        # Where the gradient changed sign, skip this step and forget the gradient (prev = 0).
        grad = grad.clone(memory_format=torch.preserve_format)
        grad[sign.eq(etaminus)] = 0
        param.addcmul_(grad.sign(), step_size, value=-1)
        prev.copy_(grad)
