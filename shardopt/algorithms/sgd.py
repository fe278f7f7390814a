"""SGD with optional momentum, dampening, Nesterov momentum and weight decay."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Group, apply_weight_decay


class SGD(Algorithm):
    torch_class = torch.optim.SGD

    def scalar_state(self, group: Group) -> dict[str, float]:
        return {}

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

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
        momentum = group["momentum"]
        if group["maximize"]:
            grad = -grad

        grad = apply_weight_decay(param, grad, group, lr)

        if momentum != 0:
            buf = state["momentum_buffer"]
            # torch has no buffer before the first step and starts it as a copy of the gradient.
            if fresh:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf

        param.add_(grad, alpha=-lr)
