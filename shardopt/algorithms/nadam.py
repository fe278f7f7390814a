"""NAdam: Adam with Nesterov momentum and a decaying momentum schedule."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Group, apply_weight_decay


class NAdam(Algorithm):
    torch_class = torch.optim.NAdam

    def scalar_state(self, group: Group) -> dict[str, float]:
        return {"step": 0.0, "mu_product": 1.0}

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

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
        beta1, beta2 = group["betas"]
        eps, momentum_decay = group["eps"], group["momentum_decay"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if group["maximize"]:
            grad = -grad

        step_t, mu_product = scalars["step"], scalars["mu_product"]
        step_t += 1
        step = step_t.item()
        bias_correction2 = 1 - beta2**step

        grad = apply_weight_decay(param, grad, group, lr)

        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
        # The product is kept in float32 (a 0-d tensor), so it rounds at every step exactly as torch's does.
        mu_product *= mu

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.div(bias_correction2).sqrt()

        mu_product_next = mu_product.item() * mu_next
        denom.add_(eps)
        param.addcdiv_(grad, denom, value=(-lr * (1.0 - mu) / (1.0 - mu_product.item())))
        param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - mu_product_next))
