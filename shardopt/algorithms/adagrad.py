"""Adagrad: per-element learning rates from the running sum of squared gradients."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import (
    Algorithm,
    Coefficients,
    Group,
    Slices,
    apply_weight_decay,
    native_lr,
    native_step,
    weight_decay_coefficients,
)


class Adagrad(Algorithm):
    torch_class = torch.optim.Adagrad
    eager_state = True

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("sum",)

    def initial_value(self, name: str, group: Group) -> float | Tensor:
        return group["initial_accumulator_value"]

    def coefficients(self, scalars: dict[str, Tensor], group: Group, fresh: bool) -> Coefficients:
        lr = _to_scalar(group["lr"])
        step_t = scalars["step"]
        step_t += 1
        step = step_t.item()
        clr = lr / (1 + (step - 1) * group["lr_decay"])
        return {**weight_decay_coefficients(group, lr), "eps": group["eps"], "neg_clr": -clr}

    def elementwise(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Coefficients, group: Group
    ) -> None:
        c = coefficients
        state_sum = state["sum"]
        if group["maximize"]:
            grad = -grad
        grad = apply_weight_decay(param, grad, c, group)

        state_sum.addcmul_(grad, grad, value=1)
        std = state_sum.sqrt().add_(c["eps"])
        param.addcdiv_(grad, std, value=c["neg_clr"])

    def native_fused(self, slices: Slices, scalars: dict[str, Tensor], group: Group, fresh: bool) -> None:
        torch._fused_adagrad_(
            slices.params,
            slices.grads,
            slices.state("sum"),
            native_step(scalars, slices),
            lr=native_lr(group, slices.params[0]),
            lr_decay=group["lr_decay"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )
