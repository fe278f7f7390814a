"""RMSprop, optionally centered and with momentum."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Group, apply_weight_decay


class RMSprop(Algorithm):
    torch_class = torch.optim.RMSprop

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        names: tuple[str, ...] = ("square_avg",)
        if group["momentum"] > 0:
            names += ("momentum_buffer",)
        if group["centered"]:
            names += ("grad_avg",)
        return names

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
        alpha, eps = group["alpha"], group["eps"]
        momentum = group["momentum"]
        square_avg = state["square_avg"]
        if group["maximize"]:
            grad = -grad

        scalars["step"] += 1
        grad = apply_weight_decay(param, grad, group, lr)

        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        if group["centered"]:
            grad_avg = state["grad_avg"]
            grad_avg.lerp_(grad, 1 - alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(eps)

        if momentum > 0:
            buf = state["momentum_buffer"]
            buf.mul_(momentum).addcdiv_(grad, avg)
            param.add_(buf, alpha=-lr)
        else:
            param.addcdiv_(grad, avg, value=-lr)
