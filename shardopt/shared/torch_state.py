"""The per-parameter state torch.optim's Adafactor and Muon keep, as the owner scheme exchanges and loads it.

A rank that does not own a parameter holds no state for it, yet takes part in the all-gather that
consolidates it: it needs the state's keys, shapes and dtypes without the values. Those follow from
the parameter alone, as torch creates them at a parameter's first step (torch/optim/_adafactor.py
and _muon.py, ``_init_group``); tests compare them with torch's own state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype


def initial_state(torch_class: type[torch.optim.Optimizer], param: Tensor) -> dict[str, Tensor]:
    """The state ``torch_class`` creates for ``param`` at its first step, in torch's key order."""
    if torch_class is torch.optim.Muon:
        return {"momentum_buffer": torch.zeros_like(param)}
    state = {"step": torch.tensor(0.0, dtype=_get_scalar_dtype())}
    if param.dim() > 1:  # factored second moment: a row and a column statistic
        state["row_var"] = param.new_zeros((*param.shape[:-1], 1))
        state["col_var"] = param.new_zeros((*param.shape[:-2], 1, param.shape[-1]))
    else:
        state["variance"] = torch.zeros_like(param)
    return state


def check_entry(entry: Any, template: Mapping[str, Tensor], algorithm: str, where: str) -> None:
    """Raise ValueError naming ``where`` unless ``entry`` is state ``algorithm`` can resume from."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"loaded optimizer state of {where} is a {type(entry).__name__}, not a dict of tensors")
    for name, expected in template.items():
        value = entry.get(name)
        if name == "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            continue
        if not isinstance(value, Tensor):
            raise ValueError(
                f"loaded optimizer state of {where} lacks the tensor {name!r}: it was not saved by {algorithm}"
            )
        if value.shape != expected.shape:
            raise ValueError(
                f"loaded optimizer state {name!r} of {where} has shape {tuple(value.shape)} but {algorithm} keeps "
                f"{tuple(expected.shape)} for this parameter: the state dict belongs to a different model"
            )
    extra = sorted(set(entry) - set(template))
    if extra:
        raise ValueError(f"loaded optimizer state of {where} has keys {algorithm} does not keep: {extra}")


def installed(entry: Mapping[str, Any], template: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A private copy of a checked ``entry`` with the template's dtypes and devices, so that every rank
    knows the dtype of every state tensor without asking the owner (torch.optim casts likewise)."""
    return {
        name: torch.as_tensor(entry[name]).to(dtype=expected.dtype, device=expected.device, copy=True)
        for name, expected in template.items()
    }
