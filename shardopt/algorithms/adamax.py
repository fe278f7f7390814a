"""Adamax: Adam with the infinity norm in place of the second moment."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Coefficients, Group, apply_weight_decay, weight_decay_coefficients


class Adamax(Algorithm):
    torch_class = torch.optim.Adamax

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("exp_avg", "exp_inf")

    def coefficients(self, scalars: dict[str, Tensor], group: Group, fresh: bool) -> Coefficients:
        lr = _to_scalar(group["lr"])
        beta1, beta2 = group["betas"]
        step_t = scalars["step"]
        step_t += 1
        bias_correction = 1 - beta1 ** step_t.item()
        clr = lr / bias_correction
        return {
            **weight_decay_coefficients(group, lr),
            "one_minus_beta1": 1 - beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "neg_clr": -clr,
        }

    def elementwise(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Coefficients, group: Group
    ) -> None:
        c = coefficients
        exp_avg, exp_inf = state["exp_avg"], state["exp_inf"]
        if group["maximize"]:
            grad = -grad
        grad = apply_weight_decay(param, grad, c, group)

        exp_avg.lerp_(grad, c["one_minus_beta1"])
        torch.maximum(exp_inf.mul_(c["beta2"]), grad.abs().add_(c["eps"]), out=exp_inf)
        param.addcdiv_(exp_avg, exp_inf, value=c["neg_clr"])
