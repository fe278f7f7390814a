"""ASGD: averaged stochastic gradient descent."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Group, apply_weight_decay


class ASGD(Algorithm):
    torch_class = torch.optim.ASGD

    def scalar_state(self, group: Group) -> dict[str, float]:
        return {"step": 0.0, "eta": float(_to_scalar(group["lr"])), "mu": 1.0}

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("ax",)

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
        lambd, alpha, t0 = group["lambd"], group["alpha"], group["t0"]
        step_t, eta, mu = scalars["step"], scalars["eta"], scalars["mu"]
        ax = state["ax"]
        if group["maximize"]:
            grad = -grad

        step_t += 1
        grad = apply_weight_decay(param, grad, group, lr)

        eta_value = eta.item()
        param.mul_(1 - lambd * eta_value)
        param.add_(grad, alpha=-eta_value)

        if mu.item() != 1:
            ax.add_(param.sub(ax).mul_(mu))
        else:
            ax.copy_(param)

        # Computed in float64 (or as a tensor, for a tensor lr) and rounded into the float32 scalars.
        step = step_t.item()
        eta.copy_(torch.as_tensor(lr / ((1 + lambd * lr * step) ** alpha)))
        mu.copy_(torch.as_tensor(1 / max(1, step - t0)))
