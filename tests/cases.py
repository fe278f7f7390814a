"""The parity table: every sharded algorithm with its keywords alone and in the combinations that interact."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import (
    ASGD,
    SGD,
    Adadelta,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    NAdam,
    Optimizer,
    RAdam,
    RMSprop,
    Rprop,
)


def _tensor_lr(value: float) -> torch.Tensor:
    return torch.tensor(value)


CASES: list[tuple[type[Optimizer], dict[str, Any]]] = [
    (Adam, {}),
    (Adam, {"lr": _tensor_lr(1e-2)}),
    (Adam, {"lr": 1e-2, "betas": (0.8, 0.99)}),
    (Adam, {"lr": 1e-2, "eps": 1e-3}),
    (Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    (Adam, {"lr": 1e-2, "amsgrad": True}),
    (Adam, {"lr": 1e-2, "maximize": True}),
    (Adam, {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    (Adam, {"lr": 1e-2, "amsgrad": True, "maximize": True, "weight_decay": 0.1}),
    (Adam, {"lr": 1e-2, "foreach": False}),
    (Adam, {"lr": 1e-2, "fused": True}),
    (AdamW, {}),
    (AdamW, {"lr": _tensor_lr(1e-2), "weight_decay": 0.1}),
    (AdamW, {"lr": 1e-2, "amsgrad": True, "maximize": True}),
    (Adamax, {}),
    (Adamax, {"lr": _tensor_lr(1e-2)}),
    (Adamax, {"lr": 1e-2, "betas": (0.8, 0.99)}),
    (Adamax, {"lr": 1e-2, "eps": 1e-2}),
    (Adamax, {"lr": 1e-2, "weight_decay": 0.1}),
    (Adamax, {"lr": 1e-2, "maximize": True, "weight_decay": 0.1}),
    (NAdam, {}),
    (NAdam, {"lr": _tensor_lr(1e-2)}),
    (NAdam, {"lr": 1e-2, "betas": (0.8, 0.99)}),
    (NAdam, {"lr": 1e-2, "momentum_decay": 0.01}),
    (NAdam, {"lr": 1e-2, "weight_decay": 0.1}),
    (NAdam, {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    (NAdam, {"lr": 1e-2, "maximize": True, "eps": 1e-3}),
    # With beta2 = 0.999 or 0.9, RAdam's first five steps skip rectification and the next five use it.
    (RAdam, {}),
    (RAdam, {"lr": _tensor_lr(1e-2)}),
    (RAdam, {"lr": 1e-2, "betas": (0.8, 0.9)}),
    (RAdam, {"lr": 1e-2, "weight_decay": 0.1}),
    (RAdam, {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    (RAdam, {"lr": 1e-2, "maximize": True, "eps": 1e-3}),
    (Adagrad, {}),
    (Adagrad, {"lr": _tensor_lr(1e-1)}),
    (Adagrad, {"lr": 1e-1, "lr_decay": 0.1}),
    (Adagrad, {"lr": 1e-1, "weight_decay": 0.1}),
    (Adagrad, {"lr": 1e-1, "initial_accumulator_value": 0.1}),
    (Adagrad, {"lr": 1e-1, "eps": 1e-3}),
    (Adagrad, {"lr": 1e-1, "maximize": True, "weight_decay": 0.1}),
    (Adadelta, {}),
    (Adadelta, {"lr": _tensor_lr(0.5)}),
    (Adadelta, {"rho": 0.5}),
    (Adadelta, {"eps": 1e-3}),
    (Adadelta, {"weight_decay": 0.1}),
    (Adadelta, {"maximize": True, "weight_decay": 0.1}),
    (RMSprop, {}),
    (RMSprop, {"lr": _tensor_lr(1e-2)}),
    (RMSprop, {"alpha": 0.9, "eps": 1e-3}),
    (RMSprop, {"weight_decay": 0.1}),
    (RMSprop, {"momentum": 0.9}),
    (RMSprop, {"centered": True}),
    (RMSprop, {"centered": True, "momentum": 0.9}),
    (RMSprop, {"maximize": True, "weight_decay": 0.1}),
    (Rprop, {}),
    (Rprop, {"lr": _tensor_lr(5e-2)}),
    (Rprop, {"etas": (0.3, 1.5)}),
    (Rprop, {"step_sizes": (5e-3, 2e-2)}),
    (Rprop, {"maximize": True}),
    (SGD, {}),
    (SGD, {"lr": _tensor_lr(1e-1)}),
    (SGD, {"lr": 1e-1, "weight_decay": 0.1}),
    (SGD, {"lr": 1e-1, "momentum": 0.9}),
    (SGD, {"lr": 1e-1, "momentum": 0.9, "dampening": 0.5}),
    (SGD, {"lr": 1e-1, "momentum": 0.9, "nesterov": True}),
    # Gradient ascent on a squared error grows without bound: a small lr keeps ten steps well-conditioned.
    (SGD, {"lr": 1e-2, "maximize": True}),
    (SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "maximize": True}),
    (ASGD, {}),
    (ASGD, {"lr": _tensor_lr(5e-2)}),
    (ASGD, {"lr": 5e-2, "lambd": 1e-2, "alpha": 0.5}),
    # t0 small enough that averaging (mu < 1) starts within the test's ten steps.
    (ASGD, {"lr": 5e-2, "t0": 3}),
    (ASGD, {"lr": 5e-2, "weight_decay": 0.1}),
    (ASGD, {"lr": 5e-2, "t0": 3, "maximize": True, "weight_decay": 0.1}),
]


def _show(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor({value.item():g})"
    return str(value).replace(" ", "")


def case_id(cls: type[Optimizer], kwargs: dict[str, Any]) -> str:
    """A readable test id: ``SGD-momentum=0.9,nesterov=True`` (``SGD-default`` without keywords)."""
    keywords = ",".join(f"{key}={_show(value)}" for key, value in kwargs.items())
    return f"{cls.__name__}-{keywords or 'default'}"
