"""The flat vector LBFGS works on, cut into one contiguous slice per rank, and the collectives over it.

torch's LBFGS sees all parameters as one flat vector (``_gather_flat_grad``'s order, a complex
parameter as its real and imaginary parts). Here it is cut into ``world_size`` slices of equal
length (the last ones padded with zeros, which add nothing to any dot product); rank r keeps
slice r of every vector of the optimizer state.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..collectives.comm import Comm


def _real(tensor: Tensor) -> Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


class FlatSlices:
    """This rank's slice of the flat parameter vector, and the moves between full vectors and slices."""

    def __init__(self, params: list[Tensor], comm: Comm) -> None:
        self._params, self._comm = params, comm
        self.numel = sum(_real(p).numel() for p in params)
        self.length = -(-self.numel // comm.world_size)
        self.start = min(comm.rank * self.length, self.numel)
        self.stop = min(self.start + self.length, self.numel)
        self.dtype = functools.reduce(torch.promote_types, [_real(p).dtype for p in params])
        self.device = params[0].device

    def mean_grad(self, what: str) -> Tensor:
        """Collective. Before: each rank's own ``p.grad`` (None counts as zeros, sparse is densified,
        as in torch's ``_gather_flat_grad``). After: returns this rank's slice of their mean."""
        world = self._comm.world_size
        full = torch.zeros(self.length * world, dtype=self.dtype, device=self.device)
        offset = 0
        for param in self._params:
            numel = _real(param).numel()
            if param.grad is not None:
                grad = param.grad.to_dense() if param.grad.is_sparse else param.grad
                full[offset : offset + numel].copy_(_real(grad).reshape(-1))
            offset += numel
        if world == 1:
            return full
        shard = full.new_empty(self.length)
        self._comm.reduce_scatter(shard, full, what).wait()
        return shard.div_(world)

    def gather(self, slices: list[Tensor], what: str) -> list[Tensor]:
        """Collective. Before: each rank holds its slice of each vector. After: returns the full
        vectors on every rank, with one all-gather for them all."""
        if not slices or self._comm.world_size == 1:
            return [s[: self.numel] for s in slices]
        local = torch.stack(slices)
        full = local.new_empty(self._comm.world_size * local.numel())
        self._comm.all_gather(full, local.reshape(-1), what).wait()
        by_rank = full.view(self._comm.world_size, len(slices), self.length)
        return list(by_rank.transpose(0, 1).reshape(len(slices), -1)[:, : self.numel].unbind())

    def cut(self, full: Tensor) -> Tensor:
        """This rank's slice of a full vector (zero-padded to the slice length)."""
        piece = torch.zeros(self.length, dtype=self.dtype, device=self.device)
        piece[: self.stop - self.start] = full.reshape(-1)[self.start : self.stop]
        return piece

    def rows(self, partials: Tensor, what: str) -> Tensor:
        """Collective: every rank's ``partials`` (a vector of k partial sums), as an N x k float64 CPU
        tensor, bit-identical on every rank.

        An all-gather rather than an all-reduce: every rank then sums (or takes the max of) the same
        numbers in the same order, so the scalars LBFGS branches on agree to the last bit on all
        ranks, and one collective serves sums and maxima alike. k is a few hundred at most.
        """
        local = partials.detach().to(device=self._comm.device, dtype=torch.float64).reshape(-1)
        full = local.new_empty(self._comm.world_size * local.numel())
        self._comm.all_gather(full, local, what).wait()
        return full.view(self._comm.world_size, -1).cpu()

    def add_(self, step_size: float | Tensor, direction: Tensor) -> None:
        """Every parameter += step_size * its part of the full ``direction`` (torch's ``_add_grad``)."""
        offset = 0
        for param in self._params:
            real = _real(param)
            numel = real.numel()
            real.add_(direction[offset : offset + numel].view_as(real), alpha=step_size)
            offset += numel
