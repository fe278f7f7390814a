"""Param-group helpers both coordinators share: torch's defaults for a keyword set, and how a
parameter is named in errors."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch


def torch_defaults(
    torch_class: type[torch.optim.Optimizer], kwargs: dict[str, Any], ours: tuple[str, ...] = ()
) -> dict[str, Any]:
    """torch's own defaults and validation for ``kwargs``, from a throwaway torch optimizer;
    an unknown keyword's error lists what ``torch_class`` takes, and ``ours`` (shardopt's own)."""
    probe = torch.nn.Parameter(torch.zeros(1, 1))  # 2-D: Muon takes nothing else
    try:
        return dict(torch_class([probe], **kwargs).defaults)
    except TypeError as error:
        if "unexpected keyword" not in str(error):
            raise
        accepted = [n for n in inspect.signature(torch_class.__init__).parameters if n not in ("self", "params")]
        also = f", and shardopt's {', '.join(ours)}" if ours else ""
        raise TypeError(f"{error}; {torch_class.__name__} takes: {', '.join(accepted)}{also}") from None


def describe(group: Mapping[str, Any], g: int, i: int) -> str:
    """Parameter ``i`` of param group ``g``, with its name where the group has ``param_names``."""
    names = group.get("param_names")
    name = f" ({names[i]!r})" if names else ""
    return f"parameter {i}{name} of param group {g}"
