"""RMSprop, optionally centered and with momentum."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Coefficients, Group, apply_weight_decay, weight_decay_coefficients


class RMSprop(Algorithm):
    torch_class = torch.optim.RMSprop
    flags = ("maximize", "centered")

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        names: tuple[str, ...] = ("square_avg",)
        if group["momentum"] > 0:
            names += ("momentum_buffer",)
        if group["centered"]:
            names += ("grad_avg",)
        return names

    def coefficients(self, scalars: dict[str, Tensor], group: Group, fresh: bool) -> Coefficients:
        lr = _to_scalar(group["lr"])
        alpha, momentum = group["alpha"], group["momentum"]
        scalars["step"] += 1
        return {
            **weight_decay_coefficients(group, lr),
            "alpha": alpha,
            "one_minus_alpha": 1 - alpha,
            "eps": group["eps"],
            "has_momentum": momentum > 0,
            "momentum": momentum,
            "neg_lr": -lr,
        }

    def elementwise(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Coefficients, group: Group
    ) -> None:
        c = coefficients
        square_avg = state["square_avg"]
        if group["maximize"]:
            grad = -grad
        grad = apply_weight_decay(param, grad, c, group)

        square_avg.mul_(c["alpha"]).addcmul_(grad, grad, value=c["one_minus_alpha"])
        if group["centered"]:
            grad_avg = state["grad_avg"]
            grad_avg.lerp_(grad, c["one_minus_alpha"])
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(c["eps"])

        if c["has_momentum"]:
            buf = state["momentum_buffer"]
            buf.mul_(c["momentum"]).addcdiv_(grad, avg)
            param.add_(buf, alpha=c["neg_lr"])
        else:
            param.addcdiv_(grad, avg, value=c["neg_lr"])
