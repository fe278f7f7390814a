"""What ``p.grad`` holds at stage 2 once backward has taken the gradient into its reduction.

Stage 2 keeps only this rank's shard of the reduced gradient, so ``p.grad`` cannot hold the
values torch code between backward and step expects. ``None`` would let that code go silently
wrong: torch's ``clip_grad_norm_`` skips parameters without a gradient and returns 0, and a
``model.zero_grad()`` meant to drop a bad batch would not be told apart from backward's own
release. A ``TakenGrad`` in ``p.grad`` instead has the gradient's shape, dtype and device and no
storage:

- reading its values (a norm, a copy, arithmetic) raises, naming what works at stage 2;
- autograd's accumulation of the next backward into it (``grad += new``) keeps ``new`` for the
  reducer, which adds it to what it took, as torch adds it to ``p.grad``;
- ``model.zero_grad()`` (set to None, or zeroed) removes it: the reducer sees that and drops the
  gradient it took for that parameter, as torch would.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

aten = torch.ops.aten

TAKEN = (
    "the gradient of this parameter was taken into shardopt's stage 2 reduction at backward (each rank "
    "keeps only its shard of the mean), so p.grad holds no values and {op} cannot read it; clip with "
    "optimizer.clip_grad_norm_(max_norm) (shardopt.clip_grad_norm_ for several optimizers), or use stage=1 "
    "(the default), which leaves the mean gradient in p.grad as DDP does"
)


class TakenGrad(Tensor):
    """A storage-less stand-in for a gradient stage 2 took (see the module docstring)."""

    incoming: Tensor | None  # what autograd added to it since the reducer looked
    zeroed: bool  # zero_() was called on it (module.zero_grad(set_to_none=False))

    @staticmethod
    def __new__(cls, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> TakenGrad:
        return Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        self.incoming = None
        self.zeroed = False

    @classmethod
    def like(cls, param: Tensor) -> TakenGrad:
        return cls(param.shape, param.dtype, param.device)

    def __deepcopy__(self, memo: dict) -> TakenGrad:
        # A copied model (an EMA made after backward) gets a stand-in too: there are no values to copy.
        return TakenGrad(self.shape, self.dtype, self.device)

    def __repr__(self) -> str:  # type: ignore[override]
        return f"TakenGrad(shape={tuple(self.shape)}, dtype={self.dtype}: taken by shardopt's stage 2 reduction)"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in (aten.add_.Tensor, aten.add.Tensor) and (kwargs or {}).get("alpha", 1) == 1:
            # Autograd accumulating the next backward's gradient: grad += new (grad + new under create_graph).
            taken, new = (args[0], args[1]) if isinstance(args[0], TakenGrad) else (args[1], args[0])
            if not isinstance(new, TakenGrad):
                taken.incoming = new if taken.incoming is None else taken.incoming + new
                return taken
        if func is aten.zero_.default:
            taken = args[0]
            taken.zeroed, taken.incoming = True, None
            return taken
        if func in (aten.detach.default, aten.alias.default):
            return args[0]
        if func is aten._to_copy.default:
            # The model cast or moved (model.to(...), .double()): its gradients follow, as torch's would.
            taken = args[0]
            options = {key: value for key, value in (kwargs or {}).items() if key != "memory_format"}
            probe = func(torch.empty(0, dtype=taken.dtype, device=taken.device), **options)  # where torch puts it
            moved = TakenGrad(taken.shape, probe.dtype, probe.device)
            moved.zeroed = taken.zeroed
            moved.incoming = None if taken.incoming is None else taken.incoming.to(moved.dtype).to(moved.device)
            return moved
        raise RuntimeError(TAKEN.format(op=func))


class Custody:
    """Stage 2, per buffer and parameter: the TakenGrad each leaves in p.grad (made once), whether one
    was left there since the last step, and whether the gradient taken was dropped since."""

    def __init__(self) -> None:
        self._taken: list[list[TakenGrad | None]] = []
        self._placed: list[list[bool]] = []
        self._dropped: list[list[bool]] = []
        #: A backward added to a gradient an earlier step() took (no zero_grad() after it).
        self.stale = False

    def add(self, size: int) -> None:
        """A buffer of ``size`` parameters."""
        self._taken.append([None] * size)
        self._placed.append([False] * size)
        self._dropped.append([False] * size)

    def stand_in(self, index: int, slot: int, param: Tensor) -> TakenGrad:
        """What ``param`` (parameter ``slot`` of buffer ``index``) holds in p.grad once its gradient is taken."""
        taken = self._taken[index][slot]
        if taken is None or taken.dtype != param.dtype or taken.device != param.device:
            taken = self._taken[index][slot] = TakenGrad.like(param)
        taken.incoming, taken.zeroed = None, False
        self._placed[index][slot] = True
        return taken

    @staticmethod
    def new_grad(param: Tensor) -> Tensor | None:
        """The gradient ``param`` has that the reduction did not take yet: what autograd added to its
        TakenGrad, or what p.grad holds instead of one."""
        grad = param.grad
        if isinstance(grad, TakenGrad):  # one an earlier step() left is found stale by drops() first
            grad, grad.incoming = grad.incoming, None
        return grad

    def drops(self, grads: list[list[Tensor | None]]) -> list[tuple[int, int]]:
        """(buffer, slot) of every parameter whose TakenGrad is gone from p.grad (set to None, replaced) or
        was zeroed since it was placed (``grads``: each buffer's p.grad): its gradient was dropped, as torch
        would drop it, and what was taken of it must be dropped too. A TakenGrad an earlier step left
        makes the gradient :attr:`stale`."""
        found = []
        for index, buffer_grads in enumerate(grads):
            placed = self._placed[index]
            for slot, grad in enumerate(buffer_grads):
                there = isinstance(grad, TakenGrad) and not grad.zeroed  # a cast model's gradients are cast ones
                if placed[slot] and not there:
                    placed[slot] = False
                    self._dropped[index][slot] = True
                    found.append((index, slot))
                elif not placed[slot] and there:
                    self.stale = True  # left in p.grad by an earlier step: torch would take that gradient again
        return found

    def dropped_flags(self) -> Tensor:
        """Per parameter: whether this rank dropped the gradient taken of it since the last step."""
        return torch.tensor([float(flag) for flags in self._dropped for flag in flags], dtype=torch.float64)

    def reset(self) -> None:
        """A new window between two steps: nothing placed or dropped."""
        self._placed = [[False] * len(flags) for flags in self._placed]
        self._dropped = [[False] * len(flags) for flags in self._dropped]
        self.stale = False
