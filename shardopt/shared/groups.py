"""Param-group helpers both coordinators share: torch's defaults for a keyword set, and how a
parameter is named in errors."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor


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


SHARDED_ALREADY = (
    "{where} is a DTensor: FSDP (fully_shard, Accelerate's or Lightning's FSDP, Trainer's --fsdp) or tensor "
    "parallelism shards it already, and shardopt shards plain data-parallel parameters; use torch.optim with "
    "FSDP, or leave FSDP out and let shardopt shard the optimizer state (DDP or no wrapper)"
)


def check_plain(param: torch.Tensor, where: str) -> None:
    """Refuse a parameter another library shards (a DTensor): shardopt's shards of it would be wrong."""
    if isinstance(param, DTensor):
        raise TypeError(SHARDED_ALREADY.format(where=where))


def members(param_groups: list[dict[str, Any]]) -> list[tuple[int, ...]]:
    """Which tensors each group holds (by identity): what the optimizer laid out, to compare at each step."""
    return [tuple(map(id, group["params"])) for group in param_groups]


def edited(param_groups: list[dict[str, Any]], laid_out: list[tuple[int, ...]]) -> str | None:
    """How ``param_groups`` differ from the members laid out (a parameter appended to, removed from or
    replaced in ``group["params"]`` by hand), or None where they do not."""
    now = members(param_groups)
    if now == laid_out:
        return None
    if len(now) != len(laid_out):
        return f"{len(now)} param groups where {len(laid_out)} were added"
    g = next(g for g, (a, b) in enumerate(zip(now, laid_out)) if a != b)
    if len(now[g]) != len(laid_out[g]):
        return f"param_groups[{g}]['params'] holds {len(now[g])} tensors where {len(laid_out[g])} were laid out"
    i = next(i for i, (a, b) in enumerate(zip(now[g], laid_out[g])) if a != b)
    replaced = f"param_groups[{g}]['params'][{i}] was replaced by another tensor"
    if isinstance(param_groups[g]["params"][i], DTensor):
        return (
            f"{replaced}, a DTensor, as FSDP's wrapping does; shardopt cannot shard what FSDP shards already: "
            "use torch.optim with FSDP, or leave FSDP out"
        )
    return replaced


EDITED = (
    "the optimizer's parameters were changed by hand after it was built ({what}, on {ranks} rank(s)): shardopt "
    "shards a group's parameters when the group is added; add parameters with opt.add_param_group({{'params': "
    "[...]}}) on every rank (collective), or build a new optimizer"
)
