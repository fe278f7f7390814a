"""RAdam: Adam with a rectified (variance-corrected) adaptive learning rate."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Coefficients, Group, adam_moments, weight_decay_coefficients


class RAdam(Algorithm):
    torch_class = torch.optim.RAdam
    flags = ("maximize", "decoupled_weight_decay")

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def coefficients(self, scalars: dict[str, Tensor], group: Group, fresh: bool) -> Coefficients:
        lr = _to_scalar(group["lr"])
        beta1, beta2 = group["betas"]
        step_t = scalars["step"]
        step_t += 1
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step

        # Length of the approximated simple moving average, and its maximum.
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        coefficients = {
            **weight_decay_coefficients(group, lr),
            "one_minus_beta1": 1 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1 - beta2,
            "bias_correction1": bias_correction1,
            "lr": lr,
            "rectify": rho_t > 5.0,
        }
        if rho_t > 5.0:
            coefficients["bias_correction2_sqrt"] = bias_correction2**0.5
            coefficients["eps"] = group["eps"]
            coefficients["rect"] = (
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            ) ** 0.5
        return coefficients

    def elementwise(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Coefficients, group: Group
    ) -> None:
        c = coefficients
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad = adam_moments(param, grad, state, c, group)
        bias_corrected_exp_avg = exp_avg / c["bias_correction1"]

        if c["rectify"]:
            adaptive_lr = c["bias_correction2_sqrt"] / exp_avg_sq.sqrt().add_(c["eps"])
            param.add_(bias_corrected_exp_avg * c["lr"] * adaptive_lr * c["rect"], alpha=-1.0)
        else:
            param.add_(bias_corrected_exp_avg * c["lr"], alpha=-1.0)
