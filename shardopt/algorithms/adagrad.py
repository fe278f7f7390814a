"""Adagrad: per-element learning rates from the running sum of squared gradients."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Group, apply_weight_decay


class Adagrad(Algorithm):
    torch_class = torch.optim.Adagrad
    eager_state = True

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("sum",)

    def initial_value(self, name: str, group: Group) -> float | Tensor:
        return group["initial_accumulator_value"]

    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        scalars: dict[str, Tensor],
        group: Group,
        fresh: bool,
    ) -> None:
        lr = _to_scalar(group["lr"])
        lr_decay, eps = group["lr_decay"], group["eps"]
        state_sum = state["sum"]

        step_t = scalars["step"]
        step_t += 1
        step = step_t.item()
        if group["maximize"]:
            grad = -grad
        grad = apply_weight_decay(param, grad, group, lr)

        clr = lr / (1 + (step - 1) * lr_decay)
        state_sum.addcmul_(grad, grad, value=1)
        std = state_sum.sqrt().add_(eps)
        param.addcdiv_(grad, std, value=-clr)
