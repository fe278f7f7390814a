"""ASGD: averaged stochastic gradient descent."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Coefficients, Group, apply_weight_decay, weight_decay_coefficients


class ASGD(Algorithm):
    torch_class = torch.optim.ASGD

    def scalar_state(self, group: Group) -> dict[str, float]:
        return {"step": 0.0, "eta": float(_to_scalar(group["lr"])), "mu": 1.0}

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("ax",)

    def coefficients(self, scalars: dict[str, Tensor], group: Group, fresh: bool) -> Coefficients:
        lr = _to_scalar(group["lr"])
        lambd, alpha, t0 = group["lambd"], group["alpha"], group["t0"]
        step_t, eta, mu = scalars["step"], scalars["eta"], scalars["mu"]
        step_t += 1
        # This step uses the eta and mu the previous one left.
        eta_value, mu_value = eta.item(), mu.item()
        coefficients = {
            **weight_decay_coefficients(group, lr),
            "shrink": 1 - lambd * eta_value,
            "neg_eta": -eta_value,
            "average": mu_value != 1,
            "mu": mu_value,
        }

        # Computed in float64 (or as a tensor, for a tensor lr) and rounded into the float32 scalars.
        step = step_t.item()
        eta.copy_(torch.as_tensor(lr / ((1 + lambd * lr * step) ** alpha)))
        mu.copy_(torch.as_tensor(1 / max(1, step - t0)))
        return coefficients

    def elementwise(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Coefficients, group: Group
    ) -> None:
        c = coefficients
        ax = state["ax"]
        if group["maximize"]:
            grad = -grad
        grad = apply_weight_decay(param, grad, c, group)

        param.mul_(c["shrink"])
        param.add_(grad, alpha=c["neg_eta"])
        if c["average"]:
            ax.add_(param.sub(ax).mul_(c["mu"]))
        elif isinstance(c["mu"], Tensor) and param.device.type == "cpu":
            # Compiled for a CPU: a kernel that only writes ax ran at half the memory roofline
            # (benchmarks/results/design_measurements.md); reading ax as well lets the hardware
            # prefetch its lines. mu is 1
            # here, so the select always takes param; it is a runtime input, so it is not folded away.
            ax.copy_(torch.where(c["mu"] == 1, param, ax))
        else:
            ax.copy_(param)
