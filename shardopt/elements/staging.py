"""Flat scratch buffers reused step after step: where gradients wait for their reduction (stage 2)
and where updated parameters are all-gathered before they are written back into the parameters.

On CPU a fresh allocation of a buffer's size costs a page fault per page at first touch; a pool
that hands the same buffers back every step pays it once.
"""

from __future__ import annotations

import torch
from torch import Tensor

PoolKey = tuple[torch.dtype, torch.device]


class StagingPool:
    """Flat scratch buffers of some dtypes and devices, reused step after step.

    One staging buffer fits any flat buffer of its dtype and device (it is as long as the longest),
    so buffers of different sizes share them.
    """

    def __init__(self) -> None:
        self._numel: dict[PoolKey, int] = {}
        self._free: dict[PoolKey, list[Tensor]] = {}
        self._created: list[Tensor] = []

    def reserve(self, numel: int, key: PoolKey) -> None:
        """Buffers of ``key`` (dtype, device) must be able to hold ``numel`` elements."""
        self._numel[key] = max(self._numel.get(key, 0), numel)

    def has_free(self, key: PoolKey) -> bool:
        return bool(self._free.get(key))

    def count(self, key: PoolKey) -> int:
        return sum((base.dtype, base.device) == key for base in self._created)

    def take(self, numel: int, key: PoolKey) -> Tensor:
        """``numel`` elements of a buffer of ``key`` (dtype, device), with arbitrary contents."""
        free = self._free.setdefault(key, [])
        while free:
            base = free.pop()
            if base.numel() >= numel:
                return base[:numel]
            self._created.remove(base)  # outgrown by a buffer added since
        base = torch.empty(self._numel[key], dtype=key[0], device=key[1])
        self._created.append(base)
        return base[:numel]

    def give(self, staging: Tensor) -> None:
        base = staging if staging._base is None else staging._base
        self._free.setdefault((base.dtype, base.device), []).append(base)

    @property
    def bytes(self) -> int:
        return sum(base.numel() * base.element_size() for base in self._created)
