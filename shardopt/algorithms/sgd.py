"""SGD with optional momentum, dampening, Nesterov momentum and weight decay."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Coefficients, Group, Slices, apply_weight_decay, native_lr, weight_decay_coefficients


class SGD(Algorithm):
    torch_class = torch.optim.SGD
    flags = ("maximize", "nesterov")

    def scalar_state(self, group: Group) -> dict[str, float]:
        return {}

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def coefficients(self, scalars: dict[str, Tensor], group: Group, fresh: bool) -> Coefficients:
        lr = _to_scalar(group["lr"])
        momentum = group["momentum"]
        coefficients = {**weight_decay_coefficients(group, lr), "has_momentum": momentum != 0, "neg_lr": -lr}
        if momentum != 0:
            # torch has no buffer before the first step and starts it as a copy of the gradient.
            coefficients |= {"first_step": fresh, "momentum": momentum, "one_minus_dampening": 1 - group["dampening"]}
        return coefficients

    def elementwise(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Coefficients, group: Group
    ) -> None:
        c = coefficients
        if group["maximize"]:
            grad = -grad
        grad = apply_weight_decay(param, grad, c, group)

        if c["has_momentum"]:
            buf = state["momentum_buffer"]
            if c["first_step"]:
                buf.copy_(grad)
            else:
                buf.mul_(c["momentum"]).add_(grad, alpha=c["one_minus_dampening"])
            grad = grad.add(buf, alpha=c["momentum"]) if group["nesterov"] else buf

        param.add_(grad, alpha=c["neg_lr"])

    def native_fused(self, slices: Slices, scalars: dict[str, Tensor], group: Group, fresh: bool) -> None:
        momentum = group["momentum"]
        torch._fused_sgd_(
            slices.params,
            slices.grads,
            slices.state("momentum_buffer") if momentum != 0 else [],
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=native_lr(group, slices.params[0]),
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            is_first_step=fresh and momentum != 0,
        )
