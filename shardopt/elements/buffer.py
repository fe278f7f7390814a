"""One flat buffer on one rank: where its parameters' elements lie in it, and this rank's shard of
their gradient and optimizer state.

The parameters keep their own storage, as under torch.optim: the flat buffer is a coordinate
system for the reduction, the update and the all-gather, not where the parameters live. A step
reads this rank's shard out of the parameters (:meth:`ShardedBuffer.read_shard`), updates it,
all-gathers the shards into a staging buffer and writes that into the parameters
(:meth:`ShardedBuffer.write_params`). So what a framework or a user does to a parameter between
steps (``model.to(...)``, a cast, ``param.data = ...``, ``load_state_dict``, safetensors
serialisation, a memory format) meets an ordinary tensor, and the next step reads what is there;
:meth:`ShardedBuffer.follow` moves the shard's state to a new dtype or device.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from .layout import BufferLayout
from .memory_order import Order, flattened, memory_order, shaped
from .taken_grad import TakenGrad

_GRAD = operator.attrgetter("grad")

# Parameter dtypes that get fp32 master weights (``master_weights``).
LOW_PRECISION = (torch.bfloat16, torch.float16)

# What a parameter's .grad held when its buffer was flattened; bits, as a reduction may take both kinds.
NO_GRAD, DENSE, SPARSE = 0, 1, 2


def grad_code(grad: Tensor | None) -> int:
    """What a ``.grad`` holds: NO_GRAD, DENSE or SPARSE (a TakenGrad: what autograd added to it)."""
    if isinstance(grad, TakenGrad):
        grad = grad.incoming
    return NO_GRAD if grad is None else SPARSE if grad.is_sparse else DENSE


class ShardedBuffer:
    """The parameters of one buffer layout and everything this rank keeps for them.

    Element-wise optimizer state covers only this rank's shard. Per-parameter scalar state
    (step counts, ...) is a few numbers per parameter, so every rank keeps all of it and
    computes it alike; that lets a parameter that no rank's shard covers (zero elements) or
    that two shards cut keep one step count.
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
        self.dtype, self.device = first.dtype, first.device
        self.orders: list[Order] = [memory_order(p) for p in params]
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
        self._reduce_dtype = grad_dtype
        self._master_weights = master_weights
        self._place()
        # fp32 master weights of this rank's shard, where the parameters are of lower precision:
        # the update runs on them, and the parameters are their rounding.
        self.master: Tensor | None = None
        self._marks: list[tuple[int, int]] = []
        self.reset_master()

    def _place(self) -> None:
        """What depends on the parameters' dtype and device."""
        # The dtype gradients are reduced in (and the gradient shard kept in).
        self.grad_dtype = self._reduce_dtype or self.dtype
        # Elements no parameter covers: a reused staging buffer must zero them.
        gaps = [torch.arange(gap.start, gap.end, device=self.device) for gap in self.layout.gaps()]
        self.gap_index = torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.long, device=self.device)
        inside = self.gap_index[(self.gap_index >= self.shard.start) & (self.gap_index < self.shard.end)]
        self.shard_gap_index = inside - self.shard.start

    @property
    def has_master(self) -> bool:
        return self._master_weights and self.dtype in LOW_PRECISION

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the update runs in: fp32 with master weights, else the parameters'."""
        return torch.float32 if self.has_master else self.dtype

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

    def new_shard(self, dtype: torch.dtype | None = None) -> Tensor:
        """A zeroed tensor of this rank's shard's length, in ``dtype`` (default: the update's)."""
        return torch.zeros(self.layout.shard_numel, dtype=dtype or self.weights_dtype, device=self.device)

    def state_tensor(self, name: str) -> Tensor:
        """This rank's shard of element-wise state ``name``, created as zeros on first use."""
        if name not in self.state:
            self.state[name] = self.new_shard()
        return self.state[name]

    # ------------------------------------------------------------------ the parameters

    @torch.no_grad()
    def read_shard(self, out: Tensor) -> Tensor:
        """Copy this rank's shard of the parameters into ``out`` (gaps zeroed)."""
        if self.shard_gap_index.numel():
            out.index_fill_(0, self.shard_gap_index, 0)
        pieces = [piece for piece in self.pieces if piece.in_shard.size]
        if pieces:  # one call: per-tensor copies of small parameters cost more than the bytes they move
            torch._foreach_copy_(
                [out[piece.in_shard.slice] for piece in pieces],
                [flattened(self.params[p.slot], self.orders[p.slot])[p.in_param.slice] for p in pieces],
            )
        return out

    @torch.no_grad()
    def read_full(self, out: Tensor) -> Tensor:
        """Copy every parameter into its span of the flat ``out`` (gaps zeroed)."""
        if self.gap_index.numel():
            out.index_fill_(0, self.gap_index, 0)
        torch._foreach_copy_(self.views(out), self.params)
        return out

    @torch.no_grad()
    def write_params(self, full: Tensor) -> None:
        """Copy the flat ``full`` (every rank's shard, gathered) into the parameters."""
        torch._foreach_copy_(self.params, self.views(full))
        if self.master is not None:
            self._marks = _marks(self.params)

    # ------------------------------------------------------------------ master weights

    def reset_master(self) -> None:
        """Take the master shard from the parameters again (they were loaded or set from outside)."""
        if not self.has_master:
            self.master = None
            return
        if self.master is None:
            self.master = self.new_shard()
        self.read_shard(self.master)
        self._marks = _marks(self.params)

    def refresh_changed_master(self) -> None:
        """Where a parameter was written or replaced since the last step wrote it (``load_state_dict``,
        ``param.data = ...``, a copy by ``model.to(...)``), the master weights take its values; elements
        whose value is still the master's rounding keep the master's fp32 precision."""
        if self.master is None:
            return
        marks = _marks(self.params)
        if marks != self._marks:
            current = self.read_shard(self.new_shard(self.dtype))
            moved = current != self.master.to(self.dtype)
            self.master[moved] = current[moved].to(self.master.dtype)
        self._marks = marks

    # ------------------------------------------------------------------ following the parameters

    def changes(self) -> tuple[torch.dtype, torch.device] | None:
        """The parameters' new (dtype, device) if they moved or were cast since this buffer last looked."""
        first = self.params[0]
        if first.dtype == self.dtype and first.device == self.device:
            return None
        return first.dtype, first.device

    def mismatch(self) -> tuple[int, str] | None:
        """What this buffer cannot follow, as (slot, what happened to it): a parameter of another shape
        than the layout's, or parameters of one buffer cast or moved apart. None: it can follow."""
        first = self.params[0]
        for position, (slot, param) in enumerate(zip(self.layout.slots, self.params)):
            if param.shape != slot.shape:
                return position, f"changed shape from {tuple(slot.shape)} to {tuple(param.shape)}"
            if param.dtype != first.dtype or param.device != first.device:
                return position, (
                    f"is {param.dtype} on {param.device} while another parameter of its buffer is {first.dtype} "
                    f"on {first.device}"
                )
        return None

    def follow(self) -> None:
        """Move this rank's shard of state (and master weights) to the parameters' dtype and device.

        The caller has checked that every parameter has its shape, and all one dtype and device
        (:meth:`mismatch`).
        Element-wise state takes the update's new dtype, as ``torch.optim.Optimizer.load_state_dict``
        casts state to its parameters'; master weights appear (the parameters became low precision)
        or go (they became fp32 or fp64) as a new optimizer over the cast model would have them.
        """
        change = self.changes()
        if change is None:
            return
        self.dtype, self.device = change
        self._place()
        self.full_grad = self.grad_shard = None
        if self.has_master and self.master is not None:
            self.master = self.master.to(self.device)
            self._marks = _marks(self.params)
        else:
            self.master = None
            self.reset_master()
        self.state = {name: tensor.to(self.device, self.weights_dtype) for name, tensor in self.state.items()}

    # ------------------------------------------------------------------ gradients

    def grad_codes(self) -> list[int]:
        """What each parameter's ``.grad`` holds now: NO_GRAD, DENSE or SPARSE."""
        return [grad_code(p.grad) for p in self.params]

    def grads(self) -> list[Tensor | None]:
        """Each parameter's ``.grad``; map(attrgetter) runs at C speed, for the one look a step takes at all."""
        return list(map(_GRAD, self.params))

    def own_grad_shard(self) -> Tensor:
        """Stage 2's shard of the reduced gradient, made at first use."""
        if self.grad_shard is None:
            self.grad_shard = self.new_shard(self.grad_dtype)
        return self.grad_shard

    @property
    def pool_key(self) -> tuple[torch.dtype, torch.device]:
        """The staging pool its gradients reduce through: one per dtype and device."""
        return (self.grad_dtype, self.device)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` (a flat buffer's length), one per parameter, shaped and laid out like it."""
        return [shaped(flat[slot.span.slice], slot.shape, order) for slot, order in zip(self.layout.slots, self.orders)]

    def flat_grad(self, slot: int, grad: Tensor) -> Tensor:
        """Parameter ``slot``'s gradient as one dimension in its span's order, in the reduction's dtype."""
        return flattened(grad, self.orders[slot]).to(self.grad_dtype)

    def bind_grads(self, full: Tensor, has_grad: list[bool]) -> None:
        """Give the parameters that have a gradient the reduced one in ``full``: views of it, or
        copies where it was reduced in another dtype (autograd needs a gradient of the parameter's)."""
        for view, param, present in zip(self.views(full), self.params, has_grad):
            if present:
                param.grad = view.to(param.dtype)

    def refresh_grads(self) -> None:
        """After ``full_grad`` changed in place (clipped, unscaled): the copies :meth:`bind_grads`
        made follow it (views already do)."""
        if self.full_grad is not None and self.grad_dtype != self.dtype:
            for view, param in zip(self.views(self.full_grad), self.params):
                if grad_code(param.grad) == DENSE:  # a sparse one is this rank's own
                    param.grad.copy_(view)

    # ------------------------------------------------------------------ bytes

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    def grad_bytes(self, stage: int) -> int:
        numel = self.layout.numel if stage == 1 else self.layout.shard_numel
        return numel * self.grad_dtype.itemsize

    def master_bytes(self) -> int:
        return 0 if self.master is None else self.master.numel() * self.master.element_size()

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


def _marks(params: list[torch.nn.Parameter]) -> list[tuple[int, int]]:
    """What tells that a parameter was written (its version) or replaced (its storage) since."""
    return [(p.data_ptr(), p._version) for p in params]
