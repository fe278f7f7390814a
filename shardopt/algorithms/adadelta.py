"""Adadelta: step sizes from running averages of squared gradients and squared updates."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Group, apply_weight_decay


class Adadelta(Algorithm):
    torch_class = torch.optim.Adadelta

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

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
        rho, eps = group["rho"], group["eps"]
        square_avg, acc_delta = state["square_avg"], state["acc_delta"]

        scalars["step"] += 1
        if group["maximize"]:
            grad = -grad
        grad = apply_weight_decay(param, grad, group, lr)

        square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
        std = square_avg.add(eps).sqrt_()
        delta = acc_delta.add(eps).sqrt_()
        delta.div_(std).mul_(grad)
        acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        param.add_(delta, alpha=-lr)
