"""Rprop: per-element step sizes adapted from the sign of successive gradients."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar

from .base import Algorithm, Coefficients, Group


class Rprop(Algorithm):
    torch_class = torch.optim.Rprop

    def tensor_state(self, group: Group) -> tuple[str, ...]:
        return ("prev", "step_size")

    def initial_value(self, name: str, group: Group) -> float | Tensor:
        return _to_scalar(group["lr"]) if name == "step_size" else 0.0

    def coefficients(self, scalars: dict[str, Tensor], group: Group, fresh: bool) -> Coefficients:
        etaminus, etaplus = group["etas"]
        step_size_min, step_size_max = group["step_sizes"]
        scalars["step"] += 1
        return {
            "etaminus": etaminus,
            "etaplus": etaplus,
            "step_size_min": step_size_min,
            "step_size_max": step_size_max,
        }

    def elementwise(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], coefficients: Coefficients, group: Group
    ) -> None:
        c = coefficients
        prev, step_size = state["prev"], state["step_size"]
        if group["maximize"]:
            grad = -grad

        # torch maps sign(grad * prev) to etaplus, etaminus or 1 (sign(NaN) is 0: 1) by three masked
        # writes. Selecting on the product gives the same values (0 < etaminus < 1 < etaplus, as torch
        # checks) and compiles to a kernel that runs at the memory roofline rather than at 2/3 of it.
        product = grad.mul(prev)
        factor = torch.where(
            product.gt(0), c["etaplus"], torch.where(product.lt(0), c["etaminus"], torch.ones_like(product))
        )
        step_size.mul_(factor).clamp_(c["step_size_min"], c["step_size_max"])

        # Where the gradient changed sign, skip this step and forget the gradient (prev = 0).
        grad = torch.where(product.lt(0), 0.0, grad)
        param.addcmul_(grad.sign(), step_size, value=-1)
        prev.copy_(grad)
