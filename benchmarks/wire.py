"""Bytes on the wire of the torch.distributed collectives a rank issues from Python.

:func:`install` replaces the Python collectives of ``torch.distributed`` (and of
``torch.distributed.distributed_c10d``, which some frameworks call directly) with
wrappers that add each call's payload, converted to what a ring algorithm sends per
rank, to a :class:`WireCounter`, then call the original. Install it before the
framework under test is imported or initialised, so that the function objects it
caches are the wrappers.

Ring costs per rank, for a group of N ranks and a payload of S bytes:
all-reduce 2(N-1)/N x S; reduce-scatter and all-gather (N-1)/N x S of the full
(unscattered / gathered) tensor; broadcast and reduce (N-1)/N x S (a pipelined chain
sends S over N-1 links: that average per rank); all-to-all (N-1)/N x S. A point-to-point
send (shardopt's rings on gloo) puts its payload on the wire once; receives count nothing.

Collectives issued from C++ (DDP's reducer, functional collectives) never reach these
wrappers: callers account for them analytically.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d


def _ring_all_reduce(n: int) -> float:
    return 2 * (n - 1) / n


def _ring_one_pass(n: int) -> float:
    return (n - 1) / n


def _point_to_point(n: int) -> float:
    return 1.0


# name -> (argument holding the payload, ring factor as a function of N).
RULES: dict[str, tuple[str, Callable[[int], float]]] = {
    "all_reduce": ("tensor", _ring_all_reduce),
    "all_reduce_coalesced": ("tensors", _ring_all_reduce),
    "broadcast": ("tensor", _ring_one_pass),
    "reduce": ("tensor", _ring_one_pass),
    # All-gathers: the payload is the gathered (full) output.
    "all_gather_single": ("output_tensor", _ring_one_pass),
    "all_gather_into_tensor": ("output_tensor", _ring_one_pass),
    "_all_gather_base": ("output_tensor", _ring_one_pass),
    "all_gather": ("tensor_list", _ring_one_pass),
    # Reduce-scatters: the payload is the full (unscattered) input.
    "reduce_scatter_single": ("input", _ring_one_pass),
    "reduce_scatter_tensor": ("input", _ring_one_pass),
    "_reduce_scatter_base": ("input", _ring_one_pass),
    "reduce_scatter": ("input_list", _ring_one_pass),
    "all_to_all_single": ("input", _ring_one_pass),
    "all_to_all": ("input_tensor_list", _ring_one_pass),
    "send": ("tensor", _point_to_point),
    "isend": ("tensor", _point_to_point),
}


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(item) for item in value)
    return 0


@dataclass
class WireCounter:
    """Wire bytes, calls and payload bytes per collective since the last :meth:`reset`."""

    wire_bytes: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)
    payload_bytes: Counter[str] = field(default_factory=Counter)
    # The deprecated names call the new ones through the module's globals, which are
    # wrapped too: only the outermost call of a thread counts.
    _depth: threading.local = field(default_factory=threading.local)

    def reset(self) -> None:
        self.wire_bytes = 0.0
        self.calls.clear()
        self.payload_bytes.clear()

    def record(self, name: str, payload: int, factor: float) -> None:
        self.wire_bytes += payload * factor
        self.calls[name] += 1
        self.payload_bytes[name] += payload

    def wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        argument, ring_factor = RULES[name]
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "value", 0)
            if depth == 0:
                bound = signature.bind_partial(*args, **kwargs).arguments
                group = bound.get("group")
                world = dist.get_world_size(group)
                if world > 1:
                    self.record(name, _nbytes(bound.get(argument)), ring_factor(world))
            self._depth.value = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth.value = depth

        counted.__wrapped_by_wire_counter__ = True  # type: ignore[attr-defined]
        return counted


def install() -> WireCounter:
    """Wrap every collective of :data:`RULES` that this torch has; returns the counter they feed."""
    counter = WireCounter()
    for name in RULES:
        original = getattr(distributed_c10d, name, None) or getattr(dist, name, None)
        if original is None or getattr(original, "__wrapped_by_wire_counter__", False):
            continue
        counted = counter.wrap(name, original)
        for module in (dist, distributed_c10d):
            if hasattr(module, name):
                setattr(module, name, counted)
    return counter
