"""NAdam: Adam with Nesterov momentum and a decaying momentum schedule."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Coefficients, Group, adam_moments, weight_decay_coefficients


class NAdam(Algorithm):
    torch_class = torch.optim.NAdam
    flags = ("maximize", "decoupled_weight_decay")

    def scalar_state(self, group: Group) -> dict[str, float]:
        return {"step": 0.0, "mu_product": 1.0}

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def coefficients(self, scalars: dict[str, Tensor], group: Group, fresh: bool) -> Coefficients:
        lr = _to_scalar(group["lr"])
        beta1, beta2 = group["betas"]
        momentum_decay = group["momentum_decay"]
        step_t, mu_product = scalars["step"], scalars["mu_product"]
        step_t += 1
        step = step_t.item()
        bias_correction2 = 1 - beta2**step

        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
        # The product is kept in float32 (a 0-d tensor), so it rounds at every step exactly as torch's does.
        mu_product *= mu
        mu_product_next = mu_product.item() * mu_next
        return {
            **weight_decay_coefficients(group, lr),
            "one_minus_beta1": 1 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1 - beta2,
            "bias_correction2": bias_correction2,
            "eps": group["eps"],
            "grad_step": -lr * (1.0 - mu) / (1.0 - mu_product.item()),
            "exp_avg_step": (-lr * mu_next) / (1.0 - mu_product_next),
        }

    def elementwise(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Coefficients, group: Group
    ) -> None:
        c = coefficients
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad = adam_moments(param, grad, state, c, group)
        denom = exp_avg_sq.div(c["bias_correction2"]).sqrt()
        denom.add_(c["eps"])
        param.addcdiv_(grad, denom, value=c["grad_step"])
        param.addcdiv_(exp_avg, denom, value=c["exp_avg_step"])
