"""Adam and AdamW (AdamW is Adam with ``decoupled_weight_decay=True``, as in torch)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import (
    Algorithm,
    Coefficients,
    Group,
    Slices,
    adam_moments,
    native_lr,
    native_step,
    weight_decay_coefficients,
)


class Adam(Algorithm):
    torch_class = torch.optim.Adam
    flags = ("maximize", "amsgrad", "decoupled_weight_decay")

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        names = ("exp_avg", "exp_avg_sq")
        return names + ("max_exp_avg_sq",) if group["amsgrad"] else names

    def coefficients(self, scalars: dict[str, Tensor], group: Group, fresh: bool) -> Coefficients:
        lr = _to_scalar(group["lr"])
        beta1, beta2 = (_to_scalar(b) for b in group["betas"])
        step_t = scalars["step"]
        step_t += 1
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        return {
            **weight_decay_coefficients(group, lr),
            "one_minus_beta1": 1 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1 - beta2,
            "bias_correction2_sqrt": bias_correction2**0.5,
            "eps": group["eps"],
            "neg_step_size": -step_size,
        }

    def elementwise(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Coefficients, group: Group
    ) -> None:
        c = coefficients
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad = adam_moments(param, grad, state, c, group)

        if group["amsgrad"]:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = (max_exp_avg_sq.sqrt() / c["bias_correction2_sqrt"]).add_(c["eps"])
        else:
            denom = (exp_avg_sq.sqrt() / c["bias_correction2_sqrt"]).add_(c["eps"])
        param.addcdiv_(exp_avg, denom, value=c["neg_step_size"])

    def native_fused(self, slices: Slices, scalars: dict[str, Tensor], group: Group, fresh: bool) -> None:
        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        kernel(
            slices.params,
            slices.grads,
            slices.state("exp_avg"),
            slices.state("exp_avg_sq"),
            slices.state("max_exp_avg_sq") if group["amsgrad"] else [],
            native_step(scalars, slices),
            amsgrad=group["amsgrad"],
            lr=native_lr(group, slices.params[0]),
            beta1=float(group["betas"][0]),
            beta2=float(group["betas"][1]),
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


class AdamW(Adam):
    torch_class = torch.optim.AdamW
