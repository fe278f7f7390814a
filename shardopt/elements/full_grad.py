"""Stage 1's full gradient of one buffer: what DDP's bucket is. Each ``p.grad`` becomes a view of
it, so the all-reduce's result lands where the next backward accumulates; one flag per parameter
rides after it in the same all-reduce (summed: how many ranks had a gradient for it)."""

from __future__ import annotations

import torch
from torch import Tensor

from .buffer import DENSE, SPARSE, ShardedBuffer, grad_code


class FullGradient:
    """One buffer's full gradient and flags (made at first use), the ``p.grad`` views of it, and what
    the last reduction left in ``p.grad`` (:attr:`bound`, None until one did)."""

    def __init__(self, buffer: ShardedBuffer) -> None:
        self._buffer = buffer
        self._storage: Tensor | None = None
        self._views: list[Tensor] = []
        self.bound: list[Tensor | None] | None = None

    def storage(self) -> Tensor:
        """The full gradient, and one flag per parameter after it (also ``buffer.full_grad``, without them)."""
        buffer = self._buffer
        if buffer.full_grad is None:
            numel = buffer.layout.numel
            self._storage = torch.zeros(numel + len(buffer.params), dtype=buffer.grad_dtype, device=buffer.device)
            buffer.full_grad = self._storage[:numel]
            self._views = buffer.views(buffer.full_grad)
        return self._storage

    def absorb(self, slots: list[int], codes: list[int]) -> None:
        """Parameters ``slots`` give their ``.grad`` to the full gradient, which each p.grad then is a view
        of (zeros where there is none, or a sparse one); the kind each gave is or-ed into ``codes``."""
        self.storage()
        targets, sources = [], []
        for slot in slots:
            param, view = self._buffer.params[slot], self._views[slot]
            grad = param.grad
            code = grad_code(grad)
            codes[slot] |= code
            if code != DENSE:
                view.zero_()  # a sparse gradient stays this rank's own in p.grad: add_sparse reduces it
            elif grad is not view:
                targets.append(view)
                sources.append(grad)
                if view.dtype == param.dtype:
                    param.grad = view  # the reduction's result lands where autograd adds the next gradient
        if targets:  # one call: per-tensor copies of small gradients cost more than the bytes they move
            torch._foreach_copy_(targets, sources)

    def set_flags(self, codes: list[int]) -> None:
        """This rank's flags: which parameters have a dense gradient."""
        storage, numel = self.storage(), self._buffer.layout.numel
        flags = [float(code & DENSE != 0) for code in codes]
        storage[numel:].copy_(torch.tensor(flags, dtype=storage.dtype))

    def settle(self, divide_by: int) -> None:
        """The reduction is done: divide the sum by ``divide_by`` (1: keep it), and make p.grad of every
        parameter that had a gradient on some rank a view of it (a copy in another dtype)."""
        buffer = self._buffer
        if divide_by > 1:
            buffer.full_grad.div_(divide_by)
        used = (self.storage()[buffer.layout.numel :] > 0).tolist()
        # A sparse gradient stays this rank's own: add_sparse reduces it, and a dense one elsewhere is an error.
        mine = buffer.grad_codes()
        buffer.bind_grads(buffer.full_grad, [present and code != SPARSE for present, code in zip(used, mine)])
        self.bound = [param.grad for param in buffer.params]
