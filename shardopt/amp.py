"""``shardopt.GradScaler``: torch's loss scaling for fp16, on a ShardedOptimizer's sharded gradients.

torch.amp.GradScaler finds infs by reading every ``p.grad``; a ShardedOptimizer holds its reduced
gradients in shards (stage 2 leaves ``p.grad`` None), and each rank would judge only its own.
This subclass asks the optimizer instead: it reduces the gradients, unscales them and finds
infs in its shards, and all ranks agree, so they skip a step together and update the scale alike.
Everything else (scale, step, update, state_dict) is torch's own. torch.optim optimizers are
handled exactly as torch.amp.GradScaler handles them, so one scaler can serve both kinds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .optimizer import ShardedOptimizer
from .replicated import ReplicatedOptimizer, unsupported_scaler


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` that also works with :class:`ShardedOptimizer` (same arguments)."""

    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: Tensor, found_inf: Tensor, allow_fp16: bool
    ) -> dict[torch.device, Tensor]:
        if isinstance(optimizer, ReplicatedOptimizer):
            raise TypeError(unsupported_scaler(optimizer._torch_class.__name__))
        if isinstance(optimizer, ShardedOptimizer):
            # fp16 shards are unscaled in place like torch's fp16 gradients under allow_fp16; their
            # update runs on fp32 master weights, which is what torch's refusal protects.
            return optimizer._unscale_for_scaler(inv_scale, found_inf)
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
