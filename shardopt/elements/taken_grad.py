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
