"""Adadelta: step sizes from running averages of squared gradients and squared updates."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Coefficients, Group, apply_weight_decay, weight_decay_coefficients


class Adadelta(Algorithm):
    torch_class = torch.optim.Adadelta

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

    def coefficients(self, scalars: dict[str, Tensor], group: Group, fresh: bool) -> Coefficients:
        lr = _to_scalar(group["lr"])
        rho = group["rho"]
        scalars["step"] += 1
        return {
            **weight_decay_coefficients(group, lr),
            "rho": rho,
            "one_minus_rho": 1 - rho,
            "eps": group["eps"],
            "neg_lr": -lr,
        }

    def elementwise(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Coefficients, group: Group
    ) -> None:
        c = coefficients
        square_avg, acc_delta = state["square_avg"], state["acc_delta"]
        if group["maximize"]:
            grad = -grad
        grad = apply_weight_decay(param, grad, c, group)

        square_avg.mul_(c["rho"]).addcmul_(grad, grad, value=c["one_minus_rho"])
        std = square_avg.add(c["eps"]).sqrt_()
        delta = acc_delta.add(c["eps"]).sqrt_()
        delta.div_(std).mul_(grad)
        acc_delta.mul_(c["rho"]).addcmul_(delta, delta, value=c["one_minus_rho"])
        param.add_(delta, alpha=c["neg_lr"])
