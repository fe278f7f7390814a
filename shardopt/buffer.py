"""One flat buffer on one rank: the parameters' storage, and this rank's shard of their
gradient and optimizer state."""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import BufferLayout

# Parameter dtypes that get fp32 master weights (``master_weights``).
LOW_PRECISION = (torch.bfloat16, torch.float16)

# What a parameter's .grad held when its buffer was flattened; bits, as a reduction may take both kinds.
NO_GRAD, DENSE, SPARSE = 0, 1, 2


def grad_code(grad: Tensor | None) -> int:
    """What a ``.grad`` holds: NO_GRAD, DENSE or SPARSE."""
    return NO_GRAD if grad is None else SPARSE if grad.is_sparse else DENSE


class ShardedBuffer:
    """The parameters of one buffer layout and everything this rank keeps for them.

    The parameters become views of ``flat``, so the all-gather that ends a step writes
    them in place. Element-wise optimizer state covers only this rank's shard.
    Per-parameter scalar state (step counts, ...) is a few numbers per parameter, so
    every rank keeps all of it and computes it alike; that lets a parameter that no
    rank's shard covers (zero elements) or that two shards cut keep one step count.
    """

    def __init__(
        self,
        layout: BufferLayout,
        params: list[torch.nn.Parameter],
        group_index: int,
        rank: int,
        scalar_names: tuple[str, ...],
        master_weights: bool = False,
        grad_dtype: torch.dtype | None = None,
    ) -> None:
        self.layout = layout
        self.params = params
        self.group_index = group_index
        first = params[0]
        self.flat = torch.zeros(layout.numel, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for slot, param in zip(layout.slots, params):
                view = self.flat[slot.span.slice]
                view.copy_(param.detach().reshape(-1))
                param.data = view.view(slot.shape)
        # Elements no parameter covers: a reused gradient staging buffer must zero them.
        gaps = [torch.arange(gap.start, gap.end, device=first.device) for gap in layout.gaps()]
        self.gap_index = torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.long, device=first.device)
        self.shard = layout.shard(rank)
        self.pieces = layout.pieces(rank)
        self.state: dict[str, Tensor] = {}
        self.scalars: dict[str, list[float]] = {name: [0.0] * len(params) for name in scalar_names}
        self.initialized = [False] * len(params)
        # True while every parameter has the same scalar state and initialisation: then one
        # update call covers the whole shard.
        self.uniform = True
        # Stage 1 keeps the full reduced gradient (p.grad are views of it); stage 2 keeps its shard only.
        self.full_grad: Tensor | None = None
        self.grad_shard: Tensor | None = None
        # The dtype gradients are reduced in (and the gradient shard kept in).
        self.grad_dtype = grad_dtype or first.dtype
        # fp32 master weights of this rank's shard, where the parameters are of lower precision:
        # the update runs on them, and the parameters are their rounding.
        self.master: Tensor | None = None
        if master_weights and first.dtype in LOW_PRECISION:
            self.master = self.param_shard.float()

    def set_scalars(self, name: str, slots: list[int], value: float) -> None:
        values = self.scalars[name]
        if len(slots) == len(values):
            values[:] = [value] * len(values)
        else:
            for slot in slots:
                values[slot] = value

    def set_initialized(self, slots: list[int]) -> None:
        if len(slots) == len(self.initialized):
            self.initialized = [True] * len(slots)
        else:
            for slot in slots:
                self.initialized[slot] = True

    @property
    def param_shard(self) -> Tensor:
        return self.flat[self.shard.slice]

    @property
    def master_shard(self) -> Tensor:
        """The weights the update reads and writes: the fp32 master shard, else the parameters' own shard."""
        return self.param_shard if self.master is None else self.master

    def state_tensor(self, name: str) -> Tensor:
        """This rank's shard of element-wise state ``name``, created as zeros on first use."""
        if name not in self.state:
            self.state[name] = torch.zeros_like(self.master_shard)
        return self.state[name]

    def grad_codes(self) -> list[int]:
        """What each parameter's ``.grad`` holds now: NO_GRAD, DENSE or SPARSE."""
        return [grad_code(p.grad) for p in self.params]

    def flatten_grads(self, out: Tensor) -> list[int]:
        """Write every parameter's ``.grad`` into its span of ``out``; returns :meth:`grad_codes`.

        Missing and sparse gradients leave zeros (a sparse one is an error the caller raises on
        every rank). Alignment gaps of ``out`` are left as they are: callers hand a zeroed buffer.
        """
        codes = self.grad_codes()
        for slot, param, code in zip(self.layout.slots, self.params, codes):
            span = out[slot.span.slice]
            if code != DENSE:
                span.zero_()
            elif param.grad.data_ptr() != span.data_ptr() or param.grad.shape != slot.shape:
                span.copy_(param.grad.reshape(-1))
        return codes

    def bind_grads(self, full: Tensor, has_grad: list[bool]) -> None:
        """Give the parameters that have a gradient the reduced one in ``full``: views of it, or
        copies where it was reduced in another dtype (autograd needs a gradient of the parameter's)."""
        for slot, param, present in zip(self.layout.slots, self.params, has_grad):
            if present:
                param.grad = full[slot.span.slice].view(slot.shape).to(param.dtype)

    def refresh_grads(self) -> None:
        """After ``full_grad`` changed in place (clipped, unscaled): the copies :meth:`bind_grads`
        made follow it (views already do)."""
        if self.full_grad is not None and self.grad_dtype != self.flat.dtype:
            for slot, param in zip(self.layout.slots, self.params):
                if grad_code(param.grad) == DENSE:  # a sparse one is this rank's own
                    param.grad.copy_(self.full_grad[slot.span.slice].view(slot.shape))

    def publish_master(self) -> None:
        """Round the updated master shard into the parameters' shard, which the all-gather reads."""
        if self.master is not None:
            self.param_shard.copy_(self.master)

    def reset_master(self) -> None:
        """Take the master shard from the parameters again (they were loaded or set from outside)."""
        if self.master is not None:
            self.master.copy_(self.param_shard)

    def grad_bytes(self, stage: int) -> int:
        numel = self.layout.numel if stage == 1 else self.layout.shard_numel
        return numel * self.grad_dtype.itemsize

    def master_bytes(self) -> int:
        return 0 if self.master is None else self.master.numel() * self.master.element_size()

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())
