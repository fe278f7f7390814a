"""The update of this rank's shards: which parameters one kernel call may update together, their
initial state, and the calls, one per batch of buffers that share a key (as torch's fused optimizers
make one call per step, not one per tensor). No communication."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..algorithms import Algorithm, Slices
from ..collectives.span import Span
from . import kernels
from .buffer import ShardedBuffer
from .layout import runs


@dataclass
class Reduced:
    """A step's gradients once reduced: what the update reads and ``clip_grad_norm_`` scales."""

    has_grad: Tensor  # per parameter, in the buffers' order: a gradient on some rank
    grad_shards: list[Tensor]  # per buffer, this rank's shard of the mean gradient
    loss: Any


@dataclass
class Work:
    """Parameters (``slots``) of one buffer that share ``key`` (fresh, scalar values), and the
    spans of this rank's shard they cover: what one kernel call may update together."""

    buffer: ShardedBuffer
    weights: Tensor  # this rank's shard of the weights the update writes
    grad_shard: Tensor
    key: tuple[bool, tuple[float, ...]]
    slots: list[int]
    spans: list[Span]


def create_state(
    algorithm: Algorithm,
    buffer: ShardedBuffer,
    group: dict[str, Any],
    slots: list[int],
    spans: list[Span],
    scalar_dtype: torch.dtype,
) -> None:
    """torch's initial state for ``slots``, whose elements in this shard are ``spans``."""
    for name, value in algorithm.scalar_state(group).items():
        buffer.set_scalars(name, slots, torch.tensor(value, dtype=scalar_dtype).item())
    for name in algorithm.tensor_state(group):
        tensor = buffer.state_tensor(name)
        fill = algorithm.initial_value(name, group)
        for span in spans:
            tensor[span.slice].fill_(fill)
    if buffer.scalars or algorithm.tensor_state(group):
        buffer.set_initialized(slots)


def plan(buffer: ShardedBuffer, weights: Tensor, grad_shard: Tensor, has_grad: Tensor) -> list[Work]:
    """What updating this rank's shard of ``buffer`` takes: one work per set of parameters
    that share their scalar state, covering the contiguous spans of the shard they hold.
    That is one work for the whole shard, unless some parameters have no gradient or fell
    behind in an earlier step."""
    everyone = bool(has_grad.all())
    if everyone and buffer.uniform:
        shard = Span(buffer.pieces[0].in_shard.start, buffer.pieces[-1].in_shard.end) if buffer.pieces else Span(0, 0)
        key = (not buffer.initialized[0], tuple(values[0] for values in buffer.scalars.values()))
        return [Work(buffer, weights, grad_shard, key, list(range(len(buffer.params))), [shard])]
    present = has_grad.tolist()
    keys = [
        (not buffer.initialized[s], tuple(values[s] for values in buffer.scalars.values())) if present[s] else None
        for s in range(len(buffer.params))
    ]
    spans = runs(buffer.pieces, keys)
    distinct = dict.fromkeys(k for k in keys if k is not None)
    buffer.uniform = everyone and len(distinct) == 1
    # A key with no element in this shard still advances its parameters' scalars.
    return [
        Work(
            buffer,
            weights,
            grad_shard,
            key,
            [s for s, k in enumerate(keys) if k == key],
            spans.get(key) or [Span(0, 0)],
        )
        for key in distinct
    ]


def run(
    algorithm: Algorithm,
    param_groups: list[dict[str, Any]],
    works: list[Work],
    scalar_dtype: torch.dtype,
    fused: bool | None,
) -> None:
    """Run ``works``: those of one group, device and dtype that share their key go to one
    kernel call, as torch's fused optimizers make one call per step, not one per tensor."""
    batches: dict[tuple[Any, ...], list[Work]] = {}
    for work in works:
        weights = work.weights
        batches.setdefault((work.buffer.group_index, weights.device, weights.dtype, work.key), []).append(work)
    for (g, _, _, (is_fresh, values)), members in batches.items():
        group = param_groups[g]
        names = algorithm.tensor_state(group)
        params, grads, states = [], [], []
        for work in members:
            buffer = work.buffer
            if is_fresh:
                create_state(algorithm, buffer, group, work.slots, work.spans, scalar_dtype)
                values = tuple(buffer.scalars[name][work.slots[0]] for name in buffer.scalars)
            state = {name: buffer.state_tensor(name) for name in names}
            weights = work.weights
            # Gradients reduced in another dtype than the weights' are cast (one slice at a time).
            grad_shard = work.grad_shard
            for span in work.spans:
                params.append(weights[span.slice])
                grads.append(grad_shard[span.slice].to(weights.dtype))
                states.append({name: tensor[span.slice] for name, tensor in state.items()})
        scalar_names = members[0].buffer.scalars
        scalars = {name: torch.tensor(value, dtype=scalar_dtype) for name, value in zip(scalar_names, values)}
        kernels.update(
            algorithm,
            Slices(params, grads, states),
            scalars,
            group,
            is_fresh,
            group.get("fused", fused),
        )
        for work in members:
            for name, scalar in scalars.items():
                work.buffer.set_scalars(name, work.slots, scalar.item())
