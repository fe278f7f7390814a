"""The errors a step raises alike on every rank, from what its agreement found: gradients stage 2
no longer holds, parameters changed in a way the buffers cannot follow, sparse gradients the
algorithm or the buffers cannot take. Each names the parameter and the fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..collectives import fingerprint
from . import sparse_grads
from .buffer import ShardedBuffer


def kind_of(buffer: ShardedBuffer) -> float:
    """A number for the dtype and device type of ``buffer``'s parameters: equal on every rank, or they differ."""
    return float(fingerprint.stable_hash((str(buffer.dtype), buffer.device.type)) % 2**40)


def where_in_groups(buffers: list[ShardedBuffer], position: int) -> tuple[int, int]:
    """(param group, index in it) of the parameter at ``position`` in ``buffers``' concatenated order."""
    for buffer in buffers:
        if position < len(buffer.params):
            return buffer.group_index, buffer.layout.slots[position].index
        position -= len(buffer.params)
    raise IndexError(position)


#: (param group, the parameter as errors name it) of the parameter at a position of the buffers' order.
Locate = Callable[[int], tuple[int, str]]


def refuse_custody(dropped: Tensor, stale: int, world_size: int, locate: Locate) -> None:
    """Stage 2: raise, on every rank, where torch would have used a gradient the reduction no longer
    holds (``stale``: ranks whose backward added to a gradient an earlier step took), or where some
    ranks dropped a parameter's gradient after backward and others did not (``dropped``: how many)."""
    if stale:
        raise RuntimeError(
            f"on {stale} rank(s) a backward added to gradients that the last step() already took (no "
            "zero_grad() after step()): torch.optim would add that old gradient, but at stage 2 it is gone; "
            "call optimizer.zero_grad() (or model.zero_grad()) after each step(), or use stage=1"
        )
    apart = (dropped > 0) & (dropped < world_size)
    if apart.any():
        position = int(apart.nonzero()[0])
        raise RuntimeError(
            f"{locate(position)[1]} had its gradient dropped after backward "
            f"(p.grad set to None, replaced or zeroed) on {int(dropped[position])} of {world_size} "
            "ranks: at stage 2 backward already summed the ranks' gradients, so every rank must drop it "
            "alike (model.zero_grad() on every rank), or use stage=1"
        )


def refuse_change(
    problems: Tensor,
    apart: Tensor,
    buffers: list[ShardedBuffer],
    found_problems: list[tuple[int, str] | None],
    describe: Callable[[int, int], str],
) -> None:
    """Raise, on every rank, for the first buffer whose parameters changed in a way it cannot follow
    (``problems``: the ranks that found one, per buffer), or that differ between the ranks in dtype or
    device (``apart``)."""
    index = int((problems.bool() | apart).nonzero()[0])
    buffer = buffers[index]
    found = found_problems[index]
    if found is None and not problems[index]:
        slot, what = 0, f"is {buffer.dtype} on {buffer.device} here, but of another dtype or device on other ranks"
    elif found is None:
        slot, what = 0, f"(or a parameter of its buffer) changed on {int(problems[index])} other rank(s)"
    else:
        slot, what = found
    where = describe(buffer.group_index, buffer.layout.slots[slot].index)
    raise RuntimeError(
        f"{where} {what} after the optimizer was built; shardopt follows a model cast or moved as a whole "
        "(model.to(...), model.half(), ...) on every rank alike, not this: change the model before "
        "building the optimizer, or build a new one"
    )


def refuse_sparse(
    dense: Tensor,
    sparse: Tensor,
    known: Tensor | None,
    torch_class: type[torch.optim.Optimizer],
    param_groups: list[dict[str, Any]],
    locate: Locate,
) -> None:
    """Raise, alike on every rank, for the first parameter whose sparse gradient this step cannot
    take. ``dense`` and ``sparse`` count the ranks with a dense and with a sparse gradient (a rank
    may have both: a dense one written after backward moved a sparse one aside); ``known``: the
    parameters sparse in earlier steps (their dense reductions skip them)."""
    suspect = sparse > 0 if known is None else (sparse > 0) | (known & (dense > 0))
    for position in suspect.nonzero().view(-1).tolist():
        g, where = locate(position)
        if sparse[position] and dense[position]:
            raise RuntimeError(
                f"{where} has a sparse gradient on {int(sparse[position])} rank(s) and a dense one on "
                f"{int(dense[position])}; every rank must produce the same kind (the same nn.Embedding(sparse=...))"
            )
        if dense[position]:
            raise RuntimeError(
                f"{where} has a dense gradient after sparse ones in earlier steps; shardopt reduces a parameter's "
                "gradients one way for the whole run: keep them sparse, or use another optimizer for it"
            )
        refusal = sparse_grads.refusal(torch_class, param_groups[g], where)
        if refusal is not None:
            raise RuntimeError(refusal)
