"""The loss a ``step(closure)`` returns, agreed by every rank: the mean over ranks, or one error.

A rank's closure returns its own loss; the step's agreement all-reduces three numbers per rank
(:func:`agreement_entries`), so that every rank raises the same error for a loss that is missing on some
ranks or is not a number, and otherwise returns the same mean (:func:`agreed`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def agreement_entries(loss: Any) -> list[float]:
    """This rank's part of the agreement: [returned a loss, its value, it is not a number]."""
    if loss is None:
        return [0.0, 0.0, 0.0]
    try:
        return [1.0, float(loss.detach() if isinstance(loss, Tensor) else loss), 0.0]
    except (TypeError, ValueError, RuntimeError):  # a vector, a string, ...: float() refuses it
        return [1.0, 0.0, 1.0]


def agreed(loss: Any, summed: list[float], world: int) -> Any:
    """The loss step() returns, from ``summed`` (the ranks' :func:`agreement_entries` summed): the mean over
    ranks, as a tensor where the closure returned one; the same error on every rank otherwise."""
    has_loss, total, not_numbers = summed
    if not_numbers:
        mine = f" (this rank's: {_describe(loss)})" if agreement_entries(loss)[2] else ""
        raise TypeError(
            f"the closure returned a loss that is not a number on {int(not_numbers)} of {world} ranks{mine}; "
            "return the loss: a Python number or a one-element tensor"
        )
    if has_loss not in (0, world):
        raise RuntimeError(f"the closure returned a loss on {int(has_loss)} of {world} ranks; return one on every rank")
    if loss is None or world == 1:
        return loss
    mean = total / world
    return torch.tensor(mean, dtype=loss.dtype, device=loss.device) if isinstance(loss, Tensor) else mean


def _describe(loss: Any) -> str:
    if isinstance(loss, Tensor):
        return f"a tensor of shape {tuple(loss.shape)}"
    return f"{type(loss).__name__} {loss!r}"[:80]
