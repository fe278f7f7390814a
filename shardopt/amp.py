"""``shardopt.GradScaler``: torch's loss scaling for fp16, on the reduced gradients of shardopt's optimizers.

torch.amp.GradScaler finds infs by reading every ``p.grad``; shardopt's optimizers reduce the
gradients first and hold them in their own way (shards; stage 2 leaves ``p.grad`` None), and
each rank would judge only its own. This subclass asks the optimizer instead: it reduces the
gradients, unscales them and finds infs in what it holds, and all ranks agree, so they skip a
step together and update the scale alike (``shared.reduced_grads.ReducedGradients``). Everything else (scale,
step, update, state_dict) is torch's own. torch.optim optimizers are handled exactly as
torch.amp.GradScaler handles them, so one scaler can serve both kinds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .shared.reduced_grads import ReducedGradients
from .shared.whole_gradients import WholeGradientOptimizer
from .slices.optimizer import SCALER_REFUSAL, ShardedLBFGS


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` that also works with shardopt's optimizers (same arguments)."""

    def _unscale_grads_(
        self, optimizer: torch.optim.Optimizer, inv_scale: Tensor, found_inf: Tensor, allow_fp16: bool
    ) -> dict[torch.device, Tensor]:
        if isinstance(optimizer, ShardedLBFGS):
            raise TypeError(SCALER_REFUSAL)
        if isinstance(optimizer, WholeGradientOptimizer) and any(
            p.dtype == torch.float16 for group in optimizer.param_groups for p in group["params"]
        ):
            # torch's own refusal: these update in the parameters' dtype (no fp32 master weights), so
            # unscaling would leave fp16 gradients. Decided from the parameters: alike on every rank.
            raise ValueError("Attempting to unscale FP16 gradients.")
        if isinstance(optimizer, ReducedGradients):
            # An ElementOptimizer's fp16 shards are unscaled in place like torch's fp16 gradients under
            # allow_fp16; their update runs on fp32 master weights, which is what torch's refusal protects.
            return optimizer._unscale_for_scaler(inv_scale, found_inf)
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
